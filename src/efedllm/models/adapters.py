"""Trainable parameters a client owns for a span of frozen blocks: LoRA adapters (through peft) and deep prompts.

A server's blocks stay frozen and are shared by every session. A training request brings the client's tensors for
the span's blocks, named by global block index, so that a client can take a span's adapters to any server that
hosts those blocks, whatever that server's own span:

- LoRA: ``blocks.{b}.{module path}.lora_A`` [rank, in] and ``...lora_B`` [out, rank], e.g.
  ``blocks.3.self_attn.q_proj.lora_A``; the layer computes ``base(x) + lora_B(lora_A(x)) * alpha / rank``
  (peft's ``LoraLayer``: no dropout, no bias);
- deep prompt tuning: ``blocks.{b}.prompts`` [prompts, hidden], added to the first ``prompts`` positions'
  hidden states before block ``b`` (``SpanModel.forward(layer_prompts=...)``);
- (shallow) prompt tuning has nothing on the servers: the client prepends its prompt embeddings.

:class:`TrainableSpan` wraps a :class:`~efedllm.models.span.SpanModel`: a copy of its module tree that shares every
base tensor (no second copy of the weights), with peft's LoRA layers injected (``peft.inject_adapter_in_model``).
A call runs it with the request's tensors in place of the adapter parameters (``torch.func.functional_call``), so
sessions with different adapters share one model and nothing of a request outlives it.

Call order: ``TrainableSpan(span_model, spec, blocks)`` (blocks: default the whole span) -> ``adapter_shapes()`` (what a client initialises, see
:func:`init_adapters`) -> per request ``forward(hidden, tensors)`` (no autograd) or ``backward(hidden, tensors,
grad_outputs)`` (recomputes the forward, then the gradients for the span's inputs and for every tensor).
"""

from __future__ import annotations

import collections
import copy
import math
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch.func import functional_call

from efedllm.common.errors import EfedllmError
from efedllm.common.spans import Span
from efedllm.models.span import SpanModel

METHODS = ("lora", "ptune", "deep-ptune")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class AdapterInputError(EfedllmError, ValueError):
    """A training request's tensors do not fit the span: the message names the tensor and what is wrong."""


@dataclass(frozen=True)
class AdapterSpec:
    """What is trained: ``method`` lora (``rank``, ``alpha``, ``targets``: projection names in every block),
    ptune or deep-ptune (``prompts`` soft prompt tokens)."""

    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    prompts: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "lora" and (self.rank < 1 or not self.alpha > 0 or not self.targets):
            raise ValueError(f"lora needs rank >= 1, alpha > 0 and a target, got {self.rank}, {self.alpha}, {self.targets}")
        if self.method != "lora" and self.prompts < 1:
            raise ValueError(f"{self.method} needs prompts >= 1, got {self.prompts}")


def _projection_sizes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of the projections of a block, by name, from a transformers config."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden)}


def adapter_shapes(config, blocks: Span, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """The tensors a client owns for ``blocks`` (what :meth:`TrainableSpan.adapter_shapes` expects), computed from
    the model's config alone: a client holds no block. ValueError for a LoRA target this does not know."""
    if spec.method == "ptune":
        return {}
    if spec.method == "deep-ptune":
        return {f"blocks.{block}.prompts": (spec.prompts, config.hidden_size) for block in range(blocks.start, blocks.end)}
    sizes = _projection_sizes(config)
    unknown = [target for target in spec.targets if target not in sizes]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not among {sorted(sizes)}")
    shapes = {}
    for block in range(blocks.start, blocks.end):
        for target in spec.targets:
            parent = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            features_in, features_out = sizes[target]
            shapes[f"blocks.{block}.{parent}.{target}.lora_A"] = (spec.rank, features_in)
            shapes[f"blocks.{block}.{parent}.{target}.lora_B"] = (features_out, spec.rank)
    return shapes


def _shared_copy(span_model: SpanModel) -> SpanModel:
    """A copy of the module tree whose parameters and buffers are the original's own tensors."""
    memo = {id(tensor): tensor for tensor in [*span_model.parameters(), *span_model.buffers()]}
    return copy.deepcopy(span_model, memo)


def _client_name(span_model: SpanModel, module_name: str) -> str:
    """``layers.{i}.self_attn.q_proj.lora_A.default.weight`` -> ``blocks.{start + i}.self_attn.q_proj.lora_A``."""
    _, index, rest = module_name.split(".", 2)
    path = rest.replace(".default.weight", "")
    return f"blocks.{span_model.span.start + int(index)}.{path}"


@dataclass
class KeptForward:
    """A forward's autograd graph: its input leaves and its outputs (what a backward differentiates)."""

    hidden: torch.Tensor  # [batch, tokens, hidden], requires grad
    leaves: dict[str, torch.Tensor]
    outputs: torch.Tensor

    def made_from(self, hidden: torch.Tensor, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether these are exactly the inputs the graph was made from (same names, shapes and values)."""
        return list(tensors) == list(self.leaves) and torch.equal(hidden, self.hidden.detach()) and \
            all(torch.equal(tensor, self.leaves[name].detach()) for name, tensor in tensors.items())


class TrainableSpan:
    """A span's frozen blocks with the client's trainable tensors applied per call (module docstring)."""

    def __init__(self, span_model: SpanModel, spec: AdapterSpec, blocks: Span | None = None) -> None:
        self.span_model, self.spec, self.blocks = span_model, spec, blocks or span_model.span
        if not span_model.span.contains(self.blocks):
            raise ValueError(f"blocks {self.blocks} are not inside the span {span_model.span}")
        self.model = _shared_copy(span_model)
        self._module_names: dict[str, str] = {}  # client name -> parameter name in self.model
        if spec.method == "lora":
            config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0,
                                bias="none")
            inject_adapter_in_model(config, self.model)
            self.model.requires_grad_(False)  # the client's tensors are the leaves, never these
            names = {_client_name(span_model, name): name for name, _ in self.model.named_parameters()
                     if ".lora_A." in name or ".lora_B." in name}
            self._module_names = {client: name for client, name in names.items()
                                  if self.blocks.start <= int(client.split(".")[1]) < self.blocks.end}
            if not self._module_names:
                raise ValueError(f"no module named {', '.join(spec.targets)} in blocks {self.blocks}")

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a request must bring, by client name, with its shape."""
        if self.spec.method == "lora":
            parameters = dict(self.model.named_parameters())
            return {client: tuple(parameters[name].shape) for client, name in self._module_names.items()}
        if self.spec.method == "deep-ptune":
            return {f"blocks.{block}.prompts": (self.spec.prompts, self.span_model.hidden_size) for block in self._blocks()}
        return {}

    def check(self, hidden: torch.Tensor, tensors: dict[str, torch.Tensor], grad_outputs: torch.Tensor | None = None) -> None:
        """AdapterInputError naming what does not fit: the inputs [batch, tokens, hidden], the tensors by name."""
        dtype, hidden_size = self.span_model.dtype, self.span_model.hidden_size
        if hidden.dim() != 3 or hidden.shape[2] != hidden_size or hidden.dtype != dtype:
            raise AdapterInputError(f"hidden states must be [batch, tokens, {hidden_size}] {dtype}, got "
                                    f"{tuple(hidden.shape)} {hidden.dtype}")
        if self.spec.method != "lora" and hidden.shape[1] < self.spec.prompts:
            raise AdapterInputError(f"{hidden.shape[1]} tokens cannot hold the {self.spec.prompts} prompt positions")
        if grad_outputs is not None and (grad_outputs.shape != hidden.shape or grad_outputs.dtype != dtype):
            raise AdapterInputError(f"output gradients must be {tuple(hidden.shape)} {dtype}, got "
                                    f"{tuple(grad_outputs.shape)} {grad_outputs.dtype}")
        expected = self.adapter_shapes()
        unknown, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        if unknown or missing:
            raise AdapterInputError(f"adapter tensors do not match blocks {self.blocks}: "
                                    f"unknown {unknown[:3]}, missing {missing[:3]}")
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != expected[name] or tensor.dtype != dtype:
                raise AdapterInputError(f"{name} must be {expected[name]} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        for name, tensor in [("hidden states", hidden), ("output gradients", grad_outputs), *tensors.items()]:
            if tensor is not None and not torch.isfinite(tensor).all():
                raise AdapterInputError(f"{name} hold NaN or infinite values")

    def forward(self, hidden: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The span's outputs [batch, tokens, hidden] for whole sequences (no cache), without autograd."""
        self.check(hidden, tensors)
        with torch.no_grad():
            return self._run(hidden, tensors)

    def forward_kept(self, hidden: torch.Tensor, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, "KeptForward"]:
        """The span's outputs [batch, tokens, hidden], and the autograd graph that made them: a backward of
        the same inputs (:meth:`backward` with ``kept``) then skips recomputing the forward."""
        self.check(hidden, tensors)
        kept = self._graph(hidden, tensors)
        return kept.outputs.detach(), kept

    def backward(self, hidden: torch.Tensor, tensors: dict[str, torch.Tensor], grad_outputs: torch.Tensor,
                 kept: "KeptForward | None" = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(d loss / d hidden [batch, tokens, hidden], d loss / d each tensor) given d loss / d outputs; through
        ``kept`` when it was made from exactly these inputs, else by recomputing the forward."""
        self.check(hidden, tensors, grad_outputs)
        if kept is None or not kept.made_from(hidden, tensors):
            kept = self._graph(hidden, tensors)
        grads = torch.autograd.grad(kept.outputs, [kept.hidden, *kept.leaves.values()], grad_outputs, allow_unused=True)
        zeros = [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(kept.leaves.values(), grads[1:])]
        return grads[0], dict(zip(kept.leaves, zeros))

    def _graph(self, hidden: torch.Tensor, tensors: dict[str, torch.Tensor]) -> KeptForward:
        """The forward with autograd on, from fresh leaves of ``hidden`` and ``tensors``."""
        with torch.enable_grad():
            leaf = hidden.detach().requires_grad_(True)
            leaves = {name: tensor.detach().requires_grad_(True) for name, tensor in tensors.items()}
            return KeptForward(leaf, leaves, self._run(leaf, leaves))

    def _blocks(self) -> range:
        return range(self.blocks.start, self.blocks.end)

    def _run(self, hidden: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.spec.method == "deep-ptune":
            layer_prompts = torch.stack([tensors[f"blocks.{block}.prompts"] for block in self._blocks()])
            return self.model(hidden, blocks=self.blocks, layer_prompts=layer_prompts)  # [layers, prompts, hidden]
        replaced = {self._module_names[name]: tensor for name, tensor in tensors.items()}
        return functional_call(self.model, replaced, (hidden,), {"blocks": self.blocks}, strict=False)


def spec_of(request) -> AdapterSpec:
    """What a training request (``method``, ``rank``, ``alpha``, ``targets``, ``prompts``: a
    :class:`~efedllm.protocol.messages.TrainRequest`) trains; LoRA's fields count for LoRA only."""
    if request.method == "lora":
        return AdapterSpec(request.method, request.rank, request.alpha, tuple(request.targets), request.prompts)
    return AdapterSpec(request.method, prompts=request.prompts)


class TrainableViews:
    """The :class:`TrainableSpan` views of one span model by (blocks, spec), built on first use, the least
    recently used dropped beyond ``max_views`` (a view copies the module tree, not the weights)."""

    def __init__(self, span_model: SpanModel, max_views: int = 8) -> None:
        self.span_model, self.max_views = span_model, max_views
        self._views: collections.OrderedDict[tuple, TrainableSpan] = collections.OrderedDict()

    def get(self, blocks: Span, spec: AdapterSpec) -> TrainableSpan:
        key = (blocks.start, blocks.end, spec)
        if key not in self._views:
            self._views[key] = TrainableSpan(self.span_model, spec, blocks)
            while len(self._views) > self.max_views:
                self._views.popitem(last=False)
        self._views.move_to_end(key)
        return self._views[key]


def init_adapters(shapes: dict[str, tuple[int, ...]], spec: AdapterSpec, generator: torch.Generator,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A client's initial tensors, as peft initialises LoRA (A: Kaiming-uniform, B: zeros, so training starts
    from the base model) and prompts (normal, std 0.02)."""
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith(".lora_A"):
            bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on [rank, in]
            tensors[name] = (torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * bound
        elif name.endswith(".lora_B"):
            tensors[name] = torch.zeros(shape, dtype=dtype)
        else:
            tensors[name] = torch.randn(shape, generator=generator, dtype=dtype) * 0.02
    return tensors
