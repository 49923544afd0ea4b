"""Fault injection for servers (``efedllm serve --fault SPEC``): a dishonest or broken server on demand.

A :class:`FaultMode` is a small extension point. The server calls it in this order:

1. ``prepare(layers)`` once, after the span's blocks are loaded and before the first step. It may
   change the blocks in place (``wrong-model`` replaces weights, ``skip-blocks`` swaps blocks for
   :class:`IdentityBlock`).
2. For every step (prefill or decode, probe or not): ``delay_seconds()`` and sleep that long
   before answering, then ``corrupt(inputs, outputs, context)`` on the span's output hidden
   states, where ``context`` is the step's :class:`StepContext` (or ``None`` where the caller has
   none); the returned tensor is what the server sends on.
3. At every announcement: ``announced_throughput(measured)`` is the throughput the record claims.
4. For every training request (:mod:`efedllm.server.training`): ``training_tensors(tensors, backward)``
   on the client's trainable tensors before the span computes with them, then, for a backward,
   ``corrupt_gradients(grad_hidden, grads)`` on what it answers.

Modes (``parse_fault`` reads them):

- ``none``: an honest server.
- ``noise:SIGMA``: adds Gaussian noise with standard deviation ``SIGMA * rms(outputs)``, where
  ``rms`` is taken over the **whole** output tensor of the step, so the noise's L2 norm is SIGMA
  times the output's. Where the attention-sink token dominates that RMS (SmolLM2's blocks
  10..19), ordinary tokens get ~9x SIGMA relative error; elsewhere about SIGMA. See
  :mod:`~efedllm.models.comparison` for what the verifier can detect.
- ``zeros``: answers zeros.
- ``random``: answers Gaussian noise with the output's RMS (no signal at all).
- ``skip-blocks`` / ``skip-blocks:N``: skips the first of every two blocks (or N blocks picked by
  the seed), passing hidden states through unchanged; saves compute, returns wrong outputs.
- ``wrong-model``: serves other weights: every parameter is redrawn with its own mean and
  standard deviation (same shapes and scales, unrelated values).
- ``intermittent:P``: on a random fraction P of steps answers like ``random``; otherwise honest.
- ``slow:MS``: honest but waits MS milliseconds per step.
- ``announce:TOKENS_PER_S``: computes honestly but announces that throughput (a liar after traffic).
- ``grad-noise:SIGMA``: training backwards answer every gradient plus Gaussian noise of SIGMA times its RMS.
- ``grad-zeros``: training backwards answer zero gradients (no work done).
- ``grad-stale``: training backwards use the trainable tensors of the first request this server saw
  for those names (an adapter the client has since updated), not the ones sent.

Rules (``MODE;RULE;RULE...``, e.g. ``noise:0.1;after=10;share=0.1``) make an output-corrupting mode
(noise, zeros, random, intermittent) cheat only on some steps, as an adaptive adversary would: a
step is corrupted only if every rule holds for its :class:`StepContext` (a step without one is
answered honestly). ``after=N``: the session already had N steps here; ``longer=N``: the session
declared ``max_length > N``; ``prefill=N``: the step has more than N tokens per row; ``batch``:
more than one row; ``verdict``: a verifier's verdict naming this server has been seen; ``push``:
the step arrived by push; ``share=P`` (0 < P <= 1): only a random share P of the steps the other
rules allow. :class:`RuledFault` applies them; its ``spec`` lists the rules in the order above.

Every fault draws from its own generator seeded at construction, so runs are reproducible.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

STEP_PATHS = ("push", "stream", "unary")


@dataclass(frozen=True)
class StepContext:
    """What the server knows about a step when it calls ``corrupt``: what rules decide on."""

    step_index: int  # 0-based: steps this session had on this server before this one
    position: int
    tokens: int  # tokens per row in this step
    rows: int
    max_length: int  # the session's declared max_length
    path: str  # how the step arrived: one of STEP_PATHS
    verdicts_seen: bool  # a verifier's verdict naming this server has been seen

    def __post_init__(self) -> None:
        for name in ("step_index", "position", "tokens", "rows", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"StepContext.{name} must be a non-negative int, got {value!r}")
        if self.path not in STEP_PATHS:
            raise ValueError(f"StepContext.path must be one of {', '.join(STEP_PATHS)}, got {self.path!r}")
        if not isinstance(self.verdicts_seen, bool):
            raise ValueError(f"StepContext.verdicts_seen must be a bool, got {self.verdicts_seen!r}")


class FaultMode:
    """Base class: an honest server. Subclasses override the hooks they need (call order above)."""

    spec = "none"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def prepare(self, layers: torch.nn.ModuleList) -> None:
        """Called once after the span is loaded; may modify ``layers`` in place."""

    def corrupt(self, inputs: torch.Tensor, outputs: torch.Tensor, context: StepContext | None = None) -> torch.Tensor:
        """Called on every step with the span's input and output hidden states ``[batch, tokens, hidden]``."""
        return outputs

    def delay_seconds(self) -> float:
        """How long to wait before answering a step."""
        return 0.0

    def announced_throughput(self, measured: float) -> float:
        """The tokens per second the server's record claims, given what it measured."""
        return measured

    def training_tensors(self, tensors: dict[str, torch.Tensor], backward: bool) -> dict[str, torch.Tensor]:
        """The client's trainable tensors a training request is computed with."""
        return tensors

    def corrupt_gradients(self, grad_hidden: torch.Tensor,
                          grads: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Called on a training backward's answer: the input gradients and each trainable tensor's gradient."""
        return grad_hidden, grads

    def gaussian_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``tensor``, drawn from this fault's generator."""
        noise = torch.randn(tensor.shape, generator=self.generator, dtype=torch.float32)
        return noise.to(device=tensor.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, seed={self.seed})"


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().pow(2).mean().sqrt()


class NoiseFault(FaultMode):
    def __init__(self, sigma: float, seed: int = 0) -> None:
        super().__init__(seed)
        self.sigma, self.spec = sigma, f"noise:{sigma:g}"

    def corrupt(self, inputs: torch.Tensor, outputs: torch.Tensor, context: StepContext | None = None) -> torch.Tensor:
        noisy = outputs.float() + self.gaussian_like(outputs) * (self.sigma * _rms(outputs))
        return noisy.to(outputs.dtype)


class ZerosFault(FaultMode):
    spec = "zeros"

    def corrupt(self, inputs: torch.Tensor, outputs: torch.Tensor, context: StepContext | None = None) -> torch.Tensor:
        return torch.zeros_like(outputs)


def random_like_output(fault: FaultMode, outputs: torch.Tensor) -> torch.Tensor:
    """Pure noise with the same RMS as ``outputs``: a plausible-looking, entirely wrong answer."""
    return (fault.gaussian_like(outputs) * _rms(outputs)).to(outputs.dtype)


class RandomFault(FaultMode):
    spec = "random"

    def corrupt(self, inputs: torch.Tensor, outputs: torch.Tensor, context: StepContext | None = None) -> torch.Tensor:
        return random_like_output(self, outputs)


class IntermittentFault(FaultMode):
    def __init__(self, probability: float, seed: int = 0) -> None:
        super().__init__(seed)
        self.probability, self.spec = probability, f"intermittent:{probability:g}"
        self.corrupted_steps = 0

    def corrupt(self, inputs: torch.Tensor, outputs: torch.Tensor, context: StepContext | None = None) -> torch.Tensor:
        if torch.rand((), generator=self.generator).item() >= self.probability:
            return outputs
        self.corrupted_steps += 1
        return random_like_output(self, outputs)


class SlowFault(FaultMode):
    def __init__(self, milliseconds: float, seed: int = 0) -> None:
        super().__init__(seed)
        self.milliseconds, self.spec = milliseconds, f"slow:{milliseconds:g}"

    def delay_seconds(self) -> float:
        return self.milliseconds / 1000.0


class AnnounceFault(FaultMode):
    def __init__(self, throughput: float, seed: int = 0) -> None:
        super().__init__(seed)
        self.throughput, self.spec = throughput, f"announce:{throughput:g}"

    def announced_throughput(self, measured: float) -> float:
        return self.throughput


class IdentityBlock(torch.nn.Module):
    """Stands in for a decoder layer and returns its hidden states unchanged (a skipped block).

    Accepts the decoder layer's call, ``layer(hidden_states, attention_mask=..., position_ids=...,
    past_key_values=..., use_cache=..., position_embeddings=...)``; it writes nothing to the cache.
    """

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class SkipBlocksFault(FaultMode):
    def __init__(self, count: int | None = None, seed: int = 0) -> None:
        super().__init__(seed)
        self.count = count
        self.spec = "skip-blocks" if count is None else f"skip-blocks:{count}"
        self.skipped: list[int] = []

    def prepare(self, layers: torch.nn.ModuleList) -> None:
        if self.count is None:
            self.skipped = list(range(0, len(layers), 2))
        else:
            if self.count > len(layers):
                raise ValueError(f"fault {self.spec}: the span has only {len(layers)} blocks")
            order = torch.randperm(len(layers), generator=self.generator)
            self.skipped = sorted(order[: self.count].tolist())
        for index in self.skipped:
            layers[index] = IdentityBlock()


class WrongModelFault(FaultMode):
    spec = "wrong-model"

    @torch.no_grad()
    def prepare(self, layers: torch.nn.ModuleList) -> None:
        for parameter in layers.parameters():
            if not parameter.is_floating_point():
                continue
            values = parameter.detach().float()
            mean, std = values.mean(), values.std() if values.numel() > 1 else torch.tensor(0.0)
            redrawn = mean + std * self.gaussian_like(parameter)
            parameter.copy_(redrawn.to(parameter.dtype))


# Rules decide when outputs are wrong, so they only make sense on a mode whose wrongness is in its outputs.
RULED_MODES = (NoiseFault, ZerosFault, RandomFault, IntermittentFault)


@dataclass(frozen=True)
class FaultRules:
    """When a :class:`RuledFault` may corrupt a step; a field left at its default does not restrict."""

    after: int | None = None  # step_index >= after
    longer: int | None = None  # max_length > longer
    prefill: int | None = None  # tokens > prefill
    batch: bool = False  # rows > 1
    verdict: bool = False  # verdicts_seen
    push: bool = False  # path == "push"
    share: float | None = None  # corrupt this random share of the steps the conditions allow (None: all)

    def __post_init__(self) -> None:
        counts_ok = all(n is None or n >= 0 for n in (self.after, self.longer, self.prefill))
        if not counts_ok or not (self.share is None or 0 < self.share <= 1):
            raise ValueError(f"FaultRules needs N >= 0 and 0 < share <= 1, got {self}")

    def allow(self, context: StepContext) -> bool:
        """Whether every condition (all but ``share``) holds for the step."""
        return ((self.after is None or context.step_index >= self.after)
                and (self.longer is None or context.max_length > self.longer)
                and (self.prefill is None or context.tokens > self.prefill)
                and (context.rows > 1 or not self.batch) and (context.verdicts_seen or not self.verdict)
                and (context.path == "push" or not self.push))

    @property
    def text(self) -> str:
        """The rules as ``--fault`` writes them (``after=10;share=0.1``), in field order."""
        given = [(name, value) for name, value in vars(self).items() if value is not None and value is not False]
        return ";".join(name if value is True else f"{name}={value if isinstance(value, int) else format(value, 'g')}"
                        for name, value in given)


class RuledFault(FaultMode):
    """``inner``'s corruption on the steps ``rules`` allow, honest answers on the rest; other hooks are ``inner``'s.

    Counts ``eligible_steps`` (the conditions held) and ``corrupted_steps`` (the share drew them; handed to ``inner``).
    """

    def __init__(self, inner: FaultMode, rules: FaultRules, seed: int = 0) -> None:
        if not isinstance(inner, RULED_MODES):
            raise ValueError(f"fault {inner.spec!r}: rules need an output-corrupting mode (noise, zeros, random, intermittent)")
        super().__init__(seed)
        self.inner, self.rules = inner, rules
        self.spec = f"{inner.spec};{rules.text}" if rules.text else inner.spec
        self.eligible_steps = self.corrupted_steps = 0

    def prepare(self, layers: torch.nn.ModuleList) -> None:
        self.inner.prepare(layers)

    def delay_seconds(self) -> float:
        return self.inner.delay_seconds()

    def announced_throughput(self, measured: float) -> float:
        return self.inner.announced_throughput(measured)

    def corrupt(self, inputs: torch.Tensor, outputs: torch.Tensor, context: StepContext | None = None) -> torch.Tensor:
        # without a context no rule can be checked, so a cheat bound by rules plays safe and answers honestly
        if context is None or not self.rules.allow(context):
            return outputs
        self.eligible_steps += 1
        # drawn on eligible steps only: P is the share of those, whatever the ineligible traffic
        if self.rules.share is not None and torch.rand((), generator=self.generator).item() >= self.rules.share:
            return outputs
        self.corrupted_steps += 1
        return self.inner.corrupt(inputs, outputs, context)


class GradNoiseFault(FaultMode):
    def __init__(self, sigma: float, seed: int = 0) -> None:
        super().__init__(seed)
        self.sigma, self.spec = sigma, f"grad-noise:{sigma:g}"

    def corrupt_gradients(self, grad_hidden, grads):
        noisy = {name: grad + self.gaussian_like(grad) * (self.sigma * _rms(grad)) for name, grad in grads.items()}
        return grad_hidden + self.gaussian_like(grad_hidden) * (self.sigma * _rms(grad_hidden)), noisy


class GradZerosFault(FaultMode):
    spec = "grad-zeros"

    def corrupt_gradients(self, grad_hidden, grads):
        return torch.zeros_like(grad_hidden), {name: torch.zeros_like(grad) for name, grad in grads.items()}


class GradStaleFault(FaultMode):
    """Remembers the first tensors it is sent under each set of names and computes backwards with those."""

    spec = "grad-stale"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.first: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def training_tensors(self, tensors, backward):
        key = tuple(tensors)
        stale = self.first.setdefault(key, {name: tensor.clone() for name, tensor in tensors.items()})
        return stale if backward else tensors


_MODES_WITHOUT_ARGUMENT = {"none": FaultMode, "zeros": ZerosFault, "random": RandomFault, "wrong-model": WrongModelFault,
                           "grad-zeros": GradZerosFault, "grad-stale": GradStaleFault}
KNOWN_MODES = ("none", "noise:SIGMA", "zeros", "random", "skip-blocks[:N]", "wrong-model", "intermittent:P", "slow:MS",
               "announce:TOKENS_PER_S", "grad-noise:SIGMA", "grad-zeros", "grad-stale")


def _number(spec: str, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"fault {spec!r}: {name} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"fault {spec!r}: {name} must be finite, got {text!r}")
    return value


def parse_fault(text: str, seed: int = 0) -> FaultMode:
    """Parse a ``--fault`` value such as ``noise:0.01`` or ``noise:0.1;after=10;share=0.1``; ValueError says what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"fault spec must be a non-empty string; known modes: {', '.join(KNOWN_MODES)}")
    spec = text.strip()
    mode_text, *rule_texts = (part.strip() for part in spec.split(";"))
    fault = _parse_mode(spec, mode_text, seed)
    return fault if not rule_texts else RuledFault(fault, _parse_rules(spec, rule_texts), seed=seed)


def _parse_mode(spec: str, text: str, seed: int) -> FaultMode:
    mode, _, argument = text.partition(":")
    if mode in _MODES_WITHOUT_ARGUMENT:
        if argument:
            raise ValueError(f"fault {spec!r}: mode {mode!r} takes no argument")
        return _MODES_WITHOUT_ARGUMENT[mode](seed=seed)
    if mode == "skip-blocks":
        return _parse_skip_blocks(spec, argument, seed)
    if mode not in ("noise", "intermittent", "slow", "announce", "grad-noise"):
        raise ValueError(f"fault {spec!r}: unknown mode {mode!r}; known modes: {', '.join(KNOWN_MODES)} "
                         f"(then optionally ;RULE... with rules {', '.join(KNOWN_RULES)})")
    if not argument:
        raise ValueError(f"fault {spec!r}: mode {mode!r} needs an argument, e.g. {mode}:{_EXAMPLES[mode]}")
    value = _number(spec, _ARGUMENT_NAMES[mode], argument)
    if mode in ("noise", "grad-noise"):
        if value <= 0:
            raise ValueError(f"fault {spec!r}: SIGMA must be > 0, got {value:g}")
        return NoiseFault(value, seed=seed) if mode == "noise" else GradNoiseFault(value, seed=seed)
    if mode == "intermittent":
        if not 0.0 < value <= 1.0:
            raise ValueError(f"fault {spec!r}: P must be in (0, 1], got {value:g}")
        return IntermittentFault(value, seed=seed)
    if value < 0:
        raise ValueError(f"fault {spec!r}: {_ARGUMENT_NAMES[mode]} must be >= 0, got {value:g}")
    return SlowFault(value, seed=seed) if mode == "slow" else AnnounceFault(value, seed=seed)


_ARGUMENT_NAMES = {"noise": "SIGMA", "intermittent": "P", "slow": "MS", "announce": "TOKENS_PER_S", "grad-noise": "SIGMA"}
_EXAMPLES = {"noise": "0.01", "intermittent": "0.2", "slow": "200", "announce": "1e6", "grad-noise": "0.05"}


def _parse_skip_blocks(spec: str, argument: str, seed: int) -> SkipBlocksFault:
    if not argument:
        return SkipBlocksFault(seed=seed)
    if not argument.isdigit() or int(argument) < 1:
        raise ValueError(f"fault {spec!r}: N must be a positive integer number of blocks, got {argument!r}")
    return SkipBlocksFault(int(argument), seed=seed)


_RULE_VALUES = {"after": "N", "longer": "N", "prefill": "N", "batch": None, "verdict": None, "push": None, "share": "P"}
KNOWN_RULES = tuple(name if kind is None else f"{name}={kind}" for name, kind in _RULE_VALUES.items())
FAULT_HELP = (f"inject a fault (verifier tests): MODE or MODE;RULE;... (corrupt only steps where every rule holds), "
              f"e.g. noise:0.1;after=10;share=0.1; modes: {', '.join(KNOWN_MODES)}; rules (noise, zeros, random, "
              f"intermittent only): {', '.join(KNOWN_RULES)}")


def _parse_rules(spec: str, texts: list[str]) -> FaultRules:
    rules: dict[str, int | float | bool] = {}
    for text in texts:
        name, has_value, value = (part.strip() for part in text.partition("="))
        if name not in _RULE_VALUES:
            raise ValueError(f"fault {spec!r}: unknown rule {text!r}; known rules: {', '.join(KNOWN_RULES)}")
        if name in rules:
            raise ValueError(f"fault {spec!r}: rule {name!r} given twice")
        rules[name] = _rule_value(spec, name, value if has_value else None)
    return FaultRules(**rules)


def _rule_value(spec: str, name: str, text: str | None) -> int | float | bool:
    kind = _RULE_VALUES[name]
    if kind is None:
        if text is not None:
            raise ValueError(f"fault {spec!r}: rule {name!r} takes no value, got {name}={text}")
        return True
    if not text:
        raise ValueError(f"fault {spec!r}: rule {name!r} needs a value {kind}, e.g. {name}={'0.1' if kind == 'P' else '10'}")
    if kind == "P":
        value = _number(spec, "share P", text)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"fault {spec!r}: rule share=P needs P in (0, 1], got {value:g}")
        return value
    if not re.fullmatch(r"\+?[0-9]+", text):
        raise ValueError(f"fault {spec!r}: rule {name}=N needs an integer N >= 0, got {text!r}")
    return int(text)
