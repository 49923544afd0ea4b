"""Weight-only int8 quantisation of a span's projections, with one scale per output channel.

A weight W [out, in] is stored as ``q = round(W / s)`` in int8 (|q| ≤ 127) and ``s = max|W_row| / 127``
[out]; the product runs in torch's own weight-only int8 kernel, ``torch._weight_int8pack_mm`` (the
CPU op torchao's int8 weight-only path uses), so no matmul kernel is written here. That kernel is
fast for bfloat16 activations only (float32 ones measured ~20x slower than a float32 matmul on this
CPU), so inputs are rounded to bfloat16 for the product and the result is returned in the input's
dtype: norms, attention and the residual stream stay in the span's dtype.

What is quantised: every ``nn.Linear`` of a decoder layer, and a mixture-of-experts layer's fused
expert tensors (transformers' ``*Experts`` modules, 3-D ``gate_up_proj`` / ``down_proj``). Routers
and norms stay as they are: they are small, and routing decisions are sensitive to rounding.

Call order: :func:`quantized_shell` on a layer built on the meta device (it swaps modules for empty
int8 ones), then ``load_state_dict({name: tensor}, strict=False, assign=True)`` one tensor at a
time: an int8 module quantises a float weight as it arrives, so a load holds one float tensor at a
time; then :func:`unloaded_tensors` to check nothing was left out.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

QUANTIZATIONS: tuple[str, ...] = ("int8",)
KERNEL_DTYPE = torch.bfloat16  # the activation dtype torch's int8 weight-only CPU kernel is fast for
INT8_MAX = 127
CHUNK_ELEMENTS = 1 << 22  # elements of a weight quantised at once


def parse_quantization(quant: str | None) -> str | None:
    """None or ``"int8"``; ValueError naming the choices for anything else."""
    if quant is None or quant in QUANTIZATIONS:
        return quant
    raise ValueError(f"quantisation {quant!r} is not supported; use one of {list(QUANTIZATIONS)} (or none)")


def weight_format(dtype: str, quant: str | None) -> str:
    """What a server announces and certifies: ``"float32"``, or ``"float32+int8"`` for int8 weights."""
    return dtype if quant is None else f"{dtype}+{quant}"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [..., out, in] (any float dtype) -> (q int8 [..., out, in], scales bfloat16 [..., out]).

    The scale is rounded to bfloat16 *before* q is computed, so ``q · s`` is the best int8 fit for the
    scale the kernel will really use. Computed in float32 in slices of rows to bound the extra memory."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[:-1], dtype=KERNEL_DTYPE)
    rows, flat_q, flat_s = weight.reshape(-1, weight.shape[-1]), q.view(-1, weight.shape[-1]), scales.view(-1)
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])  # rows per slice: float32 temporaries stay ~16 MB
    for first in range(0, rows.shape[0], step):
        chunk = rows[first:first + step].to(torch.float32, copy=True)  # [step, in] (divided in place below)
        scale = (chunk.abs().amax(dim=-1) / INT8_MAX).clamp_min(1e-12).to(KERNEL_DTYPE)  # [step]
        flat_q[first:first + step] = chunk.div_(scale.float().unsqueeze(-1)).round_().clamp_(-INT8_MAX, INT8_MAX)
        flat_s[first:first + step] = scale
    return q, scales


def int8_matmul(inputs: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``inputs`` [..., in] @ (q·s)ᵀ -> [..., out], in the inputs' dtype (the product in bfloat16)."""
    flat = inputs.reshape(-1, inputs.shape[-1]).to(KERNEL_DTYPE).contiguous()  # [N, in]
    product = torch._weight_int8pack_mm(flat, q, scales)  # [N, out]
    return product.reshape(*inputs.shape[:-1], q.shape[0]).to(inputs.dtype)


class Int8Linear(nn.Module):
    """``y = x·(q·s)ᵀ + b``: q int8 [out, in] and scales [out] are buffers (frozen), b is kept as loaded.

    Loading a float ``weight`` (``load_state_dict``) quantises it; its own state dict holds
    ``weight_int8`` and ``scales``, so a quantised span also round-trips as is."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=KERNEL_DTYPE, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = int8_matmul(inputs, self.weight_int8, self.scales)  # [..., out]
        return outputs if self.bias is None else outputs + self.bias.to(outputs.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        weight = state_dict.pop(prefix + "weight", None)
        if weight is not None:
            if tuple(weight.shape) != (self.out_features, self.in_features):
                errors.append(f"{prefix}weight: shape {tuple(weight.shape)} != {(self.out_features, self.in_features)}")
                return
            state_dict[prefix + "weight_int8"], state_dict[prefix + "scales"] = quantize_rows(weight)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Experts(nn.Module):
    """A mixture-of-experts layer's experts (transformers' fused ``gate_up_proj`` [E, 2I, H] and
    ``down_proj`` [E, H, I]) with int8 weights, run as transformers' eager experts loop runs them."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.num_experts, self.act_fn = experts.num_experts, experts.act_fn
        experts_count, twice_intermediate, hidden = experts.gate_up_proj.shape
        for name, shape in (("gate_up_proj", (experts_count, twice_intermediate, hidden)),
                            ("down_proj", (experts_count, hidden, twice_intermediate // 2))):
            self.register_buffer(f"{name}_int8", torch.empty(shape, dtype=torch.int8, device="meta"))
            self.register_buffer(f"{name}_scales", torch.empty(shape[:-1], dtype=KERNEL_DTYPE, device="meta"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for name in ("gate_up_proj", "down_proj"):
            weight = state_dict.pop(prefix + name, None)
            if weight is not None:
                expected = tuple(getattr(self, f"{name}_int8").shape)
                if tuple(weight.shape) != expected:
                    errors.append(f"{prefix}{name}: shape {tuple(weight.shape)} != {expected}")
                    continue
                state_dict[f"{prefix}{name}_int8"], state_dict[f"{prefix}{name}_scales"] = quantize_rows(weight)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def load_part(self, name: str, index: tuple, part: torch.Tensor) -> None:
        """Quantise one stored part of ``name`` (``gate_up_proj`` or ``down_proj``) into its rows at ``index``."""
        q, scales = getattr(self, f"{name}_int8"), getattr(self, f"{name}_scales")
        if q.is_meta:  # the first part allocates the whole int8 tensor, never a float one
            q, scales = torch.empty(q.shape, dtype=torch.int8), torch.empty(scales.shape, dtype=KERNEL_DTYPE)
            setattr(self, f"{name}_int8", q)
            setattr(self, f"{name}_scales", scales)
        if tuple(q[index].shape) != tuple(part.shape):
            raise ValueError(f"{name}: a stored part of shape {tuple(part.shape)} does not fit {tuple(q[index].shape)}")
        q[index], scales[index] = quantize_rows(part)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states [tokens, H]; top_k_index / top_k_weights [tokens, k]
        final = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            token_index, slot = torch.where(top_k_index == expert)
            state = hidden_states[token_index]  # [n, H]
            gate, up = int8_matmul(state, self.gate_up_proj_int8[expert], self.gate_up_proj_scales[expert]).chunk(2, dim=-1)
            out = int8_matmul(self.act_fn(gate) * up, self.down_proj_int8[expert], self.down_proj_scales[expert])  # [n, H]
            final.index_add_(0, token_index, (out * top_k_weights[token_index, slot, None]).to(final.dtype))
        return final


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3 == down.dim()


def quantized_shell(layer: nn.Module, quant: str | None) -> nn.Module:
    """``layer`` (on the meta device) with its projections swapped for empty int8 modules (in place)."""
    if parse_quantization(quant) is None:
        return layer
    for name, module in list(layer.named_modules()):
        if not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        if type(module) is nn.Linear:
            setattr(parent, child, Int8Linear(module.in_features, module.out_features, module.bias is not None, "meta"))
        elif _is_fused_experts(module):
            setattr(parent, child, Int8Experts(module))
    return layer


def quantize_module(module: nn.Module, quant: str | None) -> nn.Module:
    """An already loaded module's projections quantised in place (weights that arrived from a peer)."""
    if parse_quantization(quant) is None:
        return module
    with torch.device("meta"):
        dense = {name: child for name, child in module.named_modules() if type(child) is nn.Linear or _is_fused_experts(child)}
        shells = {name: quantized_shell(nn.Sequential(child), quant)[0] for name, child in dense.items()}
    for name, shell in shells.items():
        shell.load_state_dict(dense[name].state_dict(), assign=True)
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, shell)
    return module


def unloaded_tensors(module: nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device (what a load left out)."""
    tensors = itertools.chain(module.named_parameters(), module.named_buffers())
    return [name for name, tensor in tensors if tensor.is_meta]


def is_quantized(module: nn.Module) -> bool:
    return any(isinstance(child, (Int8Linear, Int8Experts)) for child in module.modules())
