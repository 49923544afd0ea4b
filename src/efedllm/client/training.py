"""A model to fine-tune whose blocks run elsewhere: an ``nn.Module`` differentiable through every span.

The client owns the embeddings, the head and every trainable tensor (LoRA adapters or soft prompts,
:mod:`efedllm.models.adapters`) with their optimiser state; each span of frozen blocks is reached through a
:class:`SpanRunner` (in this process: :class:`LocalSpanRunner`). :class:`SpanFunction` is the autograd function
of one span: its forward sends the span's inputs and the span's tensors (with the step's id, so the server may
keep the forward's graph) and keeps both; its backward sends them again with the output gradients, and the runner
returns the gradients for the inputs and the tensors, through the kept graph when it has it for exactly those
inputs, else by recomputing the forward (so a failed runner can be replaced by another).
A plain PyTorch loop works: ``loss = model(input_ids, labels).loss; loss.backward(); optimizer.step()``;
gradient accumulation and clipping behave as locally.

Call order: ``TrainableCausalLM(parts, runners, spec, tensors)`` -> ``parameters()`` to an optimiser ->
``forward(input_ids [batch, tokens], labels=...)`` -> ``adapter_tensors()`` to save.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import logging
import uuid

import torch
from torch import nn
from torch.nn import functional

from efedllm.client.routing import MissingBlocksError
from efedllm.client.training_audit import TrainingAuditor
from efedllm.common.errors import RecordError
from efedllm.common.spans import Span
from efedllm.dht.records import ServerState
from efedllm.models.adapters import AdapterSpec, TrainableSpan, adapter_shapes, init_adapters
from efedllm.models.span import ClientParts
from efedllm.protocol.messages import TrainRequest
from efedllm.protocol.service import HopFailure

logger = logging.getLogger(__name__)
IGNORE = -100  # label of a position that does not count in the loss (soft prompts, padding)


class SpanRunner(Protocol):
    """Computes one span for training. A forward with a ``step_id`` will be followed by the backward of that
    step (the runner may keep its autograd graph for it); a backward may always have to recompute the forward."""

    span: Span

    def forward(self, hidden: torch.Tensor, tensors: dict[str, torch.Tensor], step_id: str | None = None) -> torch.Tensor: ...

    def backward(self, hidden: torch.Tensor, tensors: dict[str, torch.Tensor], grad_outputs: torch.Tensor,
                 step_id: str | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


MAX_KEPT_LOCAL = 4  # forwards whose backward never came (an exception in between) are dropped beyond this


class LocalSpanRunner:
    """A span in this process; it keeps each step's forward graph for its backward, as plain autograd does."""

    def __init__(self, trainable: TrainableSpan) -> None:
        self.trainable, self.span = trainable, trainable.blocks
        self._kept: dict[str, object] = {}

    def forward(self, hidden, tensors, step_id=None):
        if step_id is None:
            return self.trainable.forward(hidden, tensors)
        outputs, self._kept[step_id] = self.trainable.forward_kept(hidden, tensors)
        while len(self._kept) > MAX_KEPT_LOCAL:
            self._kept.pop(next(iter(self._kept)))
        return outputs

    def backward(self, hidden, tensors, grad_outputs, step_id=None):
        return self.trainable.backward(hidden, tensors, grad_outputs, self._kept.pop(step_id, None))


class RemoteSpanRunner:
    """Blocks of one span on a server of the swarm (``host``: the distributed model, whose loop, view and stubs
    it uses). A call that fails bans that server for a while and is replayed, unchanged, on another server that
    hosts the blocks: a training request holds no state, so the replay loses nothing and changes no result.
    With an ``auditor`` (:mod:`efedllm.client.training_audit`) every answer must carry a receipt binding it to
    its server, and a share is recomputed by a verifier before it is used: a lie is replayed likewise."""

    def __init__(self, host, blocks: Span, peer_id: str, spec: AdapterSpec, attempts: int = 3,
                 timeout: float = 120.0, auditor: TrainingAuditor | None = None) -> None:
        self.host, self.span, self.peer_id, self.spec = host, blocks, peer_id, spec
        self.attempts, self.timeout, self.auditor = attempts, timeout, auditor
        self.replays = 0
        self.liars: list[str] = []  # servers a verifier found lying to this runner, in order
        self.bytes_sent = self.bytes_received = 0

    def forward(self, hidden, tensors, step_id=None):
        return self._call(False, [hidden, *tensors.values()], tuple(tensors), step_id)[0]

    def backward(self, hidden, tensors, grad_outputs, step_id=None):
        answer = self._call(True, [hidden, grad_outputs, *tensors.values()], tuple(tensors), step_id)
        return answer[0], dict(zip(tensors, answer[1:]))

    def _request(self, backward: bool, names: tuple[str, ...], step_id: str | None) -> TrainRequest:
        spec, lora = self.spec, self.spec.method == "lora"
        return TrainRequest(self.span, spec.method, names, backward, spec.rank if lora else 0,
                            spec.alpha if lora else 0.0, spec.targets if lora else (), spec.prompts,
                            receipts=self.auditor is not None, step_id=step_id or "")

    def _call(self, backward: bool, payload: list[torch.Tensor], names: tuple[str, ...],
              step_id: str | None) -> list[torch.Tensor]:
        # the backward carries the step's inputs again: a server that kept the forward's graph checks they are
        # the same and skips the recompute, and any other server (a replay after a failure) can recompute it
        request = self._request(backward, names, step_id)
        for attempt in range(self.attempts):
            try:
                exchange = self.host.run(self.host.stub(self.peer_id).train_exchange(request, payload, self.timeout))
                lie = self._audited_lie(exchange, request)
            except (HopFailure, RecordError) as error:
                lie = f"failed ({error})"
            if lie is None:
                self.bytes_sent += sum(tensor.numel() * 4 for tensor in payload)
                self.bytes_received += sum(tensor.numel() * 4 for tensor in exchange.tensors)
                return exchange.tensors
            if attempt + 1 == self.attempts:
                raise HopFailure(self.peer_id, f"training step on {self.peer_id} {lie}; no attempts left")
            logger.warning("training step on %s %s; replaying it on another server", self.peer_id, lie)
            self.host.view.ban(self.peer_id)
            self.peer_id = self._replacement()
            self.replays += 1
        raise AssertionError("unreachable")

    def _audited_lie(self, exchange, request: TrainRequest) -> str | None:
        """Why this answer is not used (a verifier proved it a lie), or None; RecordError for a bad receipt."""
        if self.auditor is None:
            return None
        evidence = self.auditor.evidence(exchange, self.peer_id, request)
        if not self.auditor.draw():
            return None
        self.auditor.audited += 1
        verdict = self.host.audit_training(evidence, exchange.request_tensors + exchange.answer_tensors)
        if isinstance(verdict, str) or verdict.verdict != "lie":
            self.auditor.unanswered += isinstance(verdict, str)
            return None  # clean, or no verdict: an audit that cannot be had does not stop training
        self.auditor.lies += 1
        self.liars.append(self.peer_id)
        return f"was proven a lie by a verifier ({verdict.reason})"

    def _replacement(self) -> str:
        """An online server, neither banned nor deactivated, that hosts all of this runner's blocks."""
        view = self.host.view
        view.refresh(0.0)
        excluded = view.banned | view.deactivated_peers()
        for info in sorted(view.servers.values(), key=lambda info: info.peer_id):
            if info.state is ServerState.ONLINE and info.peer_id not in excluded and info.span.contains(self.span):
                return info.peer_id
        raise MissingBlocksError(list(range(self.span.start, self.span.end)))


class SpanFunction(torch.autograd.Function):
    """Autograd through one runner: ``apply(runner, names, step_id, hidden, *tensors)`` -> outputs [batch, tokens,
    hidden]; ``step_id`` (None when no backward will come) lets the runner keep the forward for the backward."""

    @staticmethod
    def forward(ctx, runner: SpanRunner, names: tuple[str, ...], step_id: str | None, hidden: torch.Tensor,
                *tensors: torch.Tensor):
        ctx.runner, ctx.names, ctx.step_id = runner, names, step_id
        ctx.save_for_backward(hidden, *tensors)
        detached = {name: tensor.detach() for name, tensor in zip(names, tensors)}
        return runner.forward(hidden.detach(), detached, step_id)

    @staticmethod
    def backward(ctx, grad_outputs: torch.Tensor):
        hidden, *tensors = ctx.saved_tensors
        grad_hidden, grads = ctx.runner.backward(hidden, dict(zip(ctx.names, tensors)), grad_outputs.contiguous(),
                                                 ctx.step_id)
        return (None, None, None, grad_hidden, *[grads[name] for name in ctx.names])


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [batch, tokens, vocab] (the soft prompt positions left out)
    loss: torch.Tensor | None


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


class TrainableCausalLM(nn.Module):
    """Embeddings -> soft prompts (ptune, deep-ptune) -> each span through its runner -> norm and head."""

    def __init__(self, parts: ClientParts, runners: list[SpanRunner], spec: AdapterSpec,
                 tensors: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                 prompts: torch.Tensor | None = None) -> None:
        super().__init__()
        spans = [runner.span for runner in runners]
        if not spans or spans[0].start != 0 or spans[-1].end != parts.config.num_hidden_layers or \
                any(left.end != right.start for left, right in zip(spans, spans[1:])):
            raise ValueError(f"the runners' spans {[str(span) for span in spans]} must cover every block in order")
        object.__setattr__(self, "parts", parts)  # not a submodule: its frozen weights are not this model's parameters
        self.runners, self.spec = runners, spec
        self.adapters = nn.ParameterDict({_key(name): nn.Parameter(tensor.clone()) for name, tensor in tensors.items()})
        self.prompts = None
        if spec.method in ("ptune", "deep-ptune"):
            initial = prompts if prompts is not None else \
                torch.randn(spec.prompts, parts.config.hidden_size, generator=generator, dtype=parts.dtype) * 0.02
            if tuple(initial.shape) != (spec.prompts, parts.config.hidden_size):
                raise ValueError(f"prompts must be {(spec.prompts, parts.config.hidden_size)}, got {tuple(initial.shape)}")
            self.prompts = nn.Parameter(initial.clone())  # [prompts, hidden], prepended to every sequence's embeddings
        self._names = {span: self._span_names(span) for span in spans}

    def _span_names(self, span: Span) -> tuple[str, ...]:
        """The names of the tensors of ``span``'s blocks (``blocks.{b}.…``)."""
        names = [key.replace("__", ".") for key in self.adapters]
        return tuple(name for name in names if span.start <= int(name.split(".")[1]) < span.end)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by name (``prompts`` for the soft prompts), detached: what a save holds."""
        tensors = {key.replace("__", "."): parameter.detach() for key, parameter in self.adapters.items()}
        if self.prompts is not None:
            tensors["prompts"] = self.prompts.detach()
        return tensors

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> CausalLMOutput:
        """``input_ids`` [batch, tokens]; with ``labels`` [batch, tokens] (IGNORE where not counted) the mean
        next-token cross-entropy, as transformers computes it."""
        logits = self.parts.logits(self.hidden_states(self.parts.embed(input_ids)))  # [batch, tokens, vocab]
        loss = None
        if labels is not None:
            loss = functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
        return CausalLMOutput(logits, loss)

    def hidden_states(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The last block's outputs [batch, tokens, hidden] for ``embeddings`` [batch, tokens, hidden], the
        soft prompts put in front and taken off again."""
        hidden = embeddings
        if self.prompts is not None:
            hidden = torch.cat([self.prompts.unsqueeze(0).expand(hidden.shape[0], -1, -1), hidden], dim=1)
        backward_comes = torch.is_grad_enabled() and any(parameter.requires_grad for parameter in self.parameters())
        step_id = uuid.uuid4().hex if backward_comes else None
        for runner in self.runners:
            names = self._names[runner.span]
            hidden = SpanFunction.apply(runner, names, step_id, hidden, *[self.adapters[_key(name)] for name in names])
        return hidden[:, self.prompts.shape[0]:] if self.prompts is not None else hidden


def initial_tensors(parts: ClientParts, spec: AdapterSpec, tensors: dict[str, torch.Tensor] | None,
                    seed: int) -> dict[str, torch.Tensor]:
    """``tensors`` checked against what ``spec`` trains in every block (ValueError naming a mismatch), or
    fresh ones (:func:`~efedllm.models.adapters.init_adapters`, seeded)."""
    shapes = adapter_shapes(parts.config, Span(0, parts.config.num_hidden_layers), spec)
    tensors = None if tensors is None else {name: tensor for name, tensor in tensors.items() if name != "prompts"}
    if tensors is None:
        return init_adapters(shapes, spec, torch.Generator().manual_seed(seed), parts.dtype)
    if set(tensors) != set(shapes):
        raise ValueError(f"the adapter holds {len(tensors)} tensors, {spec.method} needs {len(shapes)}: "
                         f"missing {sorted(set(shapes) - set(tensors))[:3]}, unknown {sorted(set(tensors) - set(shapes))[:3]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, the model needs {shapes[name]}")
    return tensors
