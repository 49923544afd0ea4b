"""Fault injection for servers (``efedllm serve --fault MODE``): a dishonest or broken server on demand.

A :class:`FaultMode` is a small extension point. The server calls it in this order:

1. ``prepare(layers)`` once, after the span's blocks are loaded and before the first step. It may
   change the blocks in place (``wrong-model`` replaces weights, ``skip-blocks`` swaps blocks for
   :class:`IdentityBlock`).
2. For every step (prefill or decode, probe or not): ``delay_seconds()`` and sleep that long
   before answering, then ``corrupt(inputs, outputs)`` on the span's output hidden states; the
   returned tensor is what the server sends on.
3. At every announcement: ``announced_throughput(measured)`` is the throughput the record claims.

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

Every fault draws from its own generator seeded at construction, so runs are reproducible.
"""

from __future__ import annotations

import math

import torch


class FaultMode:
    """Base class: an honest server. Subclasses override the hooks they need (call order above)."""

    spec = "none"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def prepare(self, layers: torch.nn.ModuleList) -> None:
        """Called once after the span is loaded; may modify ``layers`` in place."""

    def corrupt(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """Called on every step with the span's input and output hidden states ``[batch, tokens, hidden]``."""
        return outputs

    def delay_seconds(self) -> float:
        """How long to wait before answering a step."""
        return 0.0

    def announced_throughput(self, measured: float) -> float:
        """The tokens per second the server's record claims, given what it measured."""
        return measured

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

    def corrupt(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        noisy = outputs.float() + self.gaussian_like(outputs) * (self.sigma * _rms(outputs))
        return noisy.to(outputs.dtype)


class ZerosFault(FaultMode):
    spec = "zeros"

    def corrupt(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(outputs)


def random_like_output(fault: FaultMode, outputs: torch.Tensor) -> torch.Tensor:
    """Pure noise with the same RMS as ``outputs``: a plausible-looking, entirely wrong answer."""
    return (fault.gaussian_like(outputs) * _rms(outputs)).to(outputs.dtype)


class RandomFault(FaultMode):
    spec = "random"

    def corrupt(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return random_like_output(self, outputs)


class IntermittentFault(FaultMode):
    def __init__(self, probability: float, seed: int = 0) -> None:
        super().__init__(seed)
        self.probability, self.spec = probability, f"intermittent:{probability:g}"
        self.corrupted_steps = 0

    def corrupt(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
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


_MODES_WITHOUT_ARGUMENT = {"none": FaultMode, "zeros": ZerosFault, "random": RandomFault, "wrong-model": WrongModelFault}
KNOWN_MODES = ("none", "noise:SIGMA", "zeros", "random", "skip-blocks[:N]", "wrong-model", "intermittent:P", "slow:MS",
               "announce:TOKENS_PER_S")


def _number(spec: str, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"fault {spec!r}: {name} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"fault {spec!r}: {name} must be finite, got {text!r}")
    return value


def parse_fault(text: str, seed: int = 0) -> FaultMode:
    """Parse a ``--fault`` value such as ``noise:0.01`` or ``intermittent:0.2``; ValueError says what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"fault spec must be a non-empty string; known modes: {', '.join(KNOWN_MODES)}")
    spec = text.strip()
    mode, _, argument = spec.partition(":")
    if mode in _MODES_WITHOUT_ARGUMENT:
        if argument:
            raise ValueError(f"fault {spec!r}: mode {mode!r} takes no argument")
        return _MODES_WITHOUT_ARGUMENT[mode](seed=seed)
    if mode == "skip-blocks":
        return _parse_skip_blocks(spec, argument, seed)
    if mode not in ("noise", "intermittent", "slow", "announce"):
        raise ValueError(f"fault {spec!r}: unknown mode {mode!r}; known modes: {', '.join(KNOWN_MODES)}")
    if not argument:
        raise ValueError(f"fault {spec!r}: mode {mode!r} needs an argument, e.g. {mode}:{_EXAMPLES[mode]}")
    value = _number(spec, _ARGUMENT_NAMES[mode], argument)
    if mode == "noise":
        if value <= 0:
            raise ValueError(f"fault {spec!r}: SIGMA must be > 0, got {value:g}")
        return NoiseFault(value, seed=seed)
    if mode == "intermittent":
        if not 0.0 < value <= 1.0:
            raise ValueError(f"fault {spec!r}: P must be in (0, 1], got {value:g}")
        return IntermittentFault(value, seed=seed)
    if value < 0:
        raise ValueError(f"fault {spec!r}: {_ARGUMENT_NAMES[mode]} must be >= 0, got {value:g}")
    return SlowFault(value, seed=seed) if mode == "slow" else AnnounceFault(value, seed=seed)


_ARGUMENT_NAMES = {"noise": "SIGMA", "intermittent": "P", "slow": "MS", "announce": "TOKENS_PER_S"}
_EXAMPLES = {"noise": "0.01", "intermittent": "0.2", "slow": "200", "announce": "1e6"}


def _parse_skip_blocks(spec: str, argument: str, seed: int) -> SkipBlocksFault:
    if not argument:
        return SkipBlocksFault(seed=seed)
    if not argument.isdigit() or int(argument) < 1:
        raise ValueError(f"fault {spec!r}: N must be a positive integer number of blocks, got {argument!r}")
    return SkipBlocksFault(int(argument), seed=seed)
