"""Compressed weight transfer (paper §4.2): a span's layers packed to bytes, factors or dense.

A compressed projection travels as it is stored: eq. 9's factors U_k, Σ_k, V_kᵀ (``k·(m+n+1)``
numbers) or the interpolative form's rows, mix and row order (``k·(m+n−k)`` numbers and m indices);
a dense one, and everything else in a layer (norms), as the dense tensor. The format is msgpack,
versioned, and validated strictly on unpacking (version, names, dtypes, shapes against byte
lengths, finite values): the bytes come from a peer.

Call order: sender ``pack_layers(layers, start)``; receiver ``unpack_layers(payload)`` then
``load_packed_layers(layers, packed)`` into freshly built (dense, uninitialised) layers of the
same architecture, which replaces the projections that arrived as factors by LowRankLinear or
InterpolativeLinear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgpack
import numpy as np
import torch
from torch import nn

from efedllm.common.dtypes import DTYPES, dtype_name
from efedllm.common.errors import EfedllmError
from efedllm.compression.lowrank import InterpolativeLinear, LowRankLinear
from efedllm.compression.svd import SvdFactors

TRANSFER_VERSION = 2  # 2: interpolative projections (rows, mix, order)
MAX_TENSORS_PER_LAYER = 64
MAX_LAYERS = 1024
FACTOR_NAMES = ("U", "S", "Vh")
INTERPOLATIVE_NAMES = ("rows", "mix", "order")
TENSOR_DTYPES = {**DTYPES, "int64": torch.int64}  # int64: an interpolative projection's row order


class TransferError(EfedllmError, ValueError):
    """A packed span from a peer is malformed."""


@dataclass(frozen=True)
class PackedSpan:
    """Per layer index: its state (tensor name -> tensor); factors keep their ``.U/.S/.Vh`` or ``.rows/.mix/.order`` names."""

    start: int
    layers: tuple[dict[str, torch.Tensor], ...]
    payload_bytes: int

    @property
    def end(self) -> int:
        return self.start + len(self.layers)


@dataclass(frozen=True)
class TransferSize:
    payload_bytes: int  # what goes on the wire
    dense_bytes: int  # the same span's state if every projection were dense

    @property
    def ratio(self) -> float:
        return self.payload_bytes / self.dense_bytes


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype == torch.int64:
        return "int64"
    try:
        return dtype_name(dtype)
    except ValueError:
        raise TransferError(f"cannot send tensors of dtype {dtype}") from None


def _encode(tensor: torch.Tensor) -> dict:
    tensor = tensor.detach().contiguous().cpu()
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape), "data": raw.numpy().tobytes()}


def pack_layers(layers: nn.ModuleList, start: int) -> bytes:
    """All of ``layers``' parameters and buffers (blocks ``start .. start+len``), factors where compressed."""
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"span start must be a non-negative integer, got {start!r}")
    encoded = [{name: _encode(tensor) for name, tensor in layer.state_dict().items()} for layer in layers]
    return msgpack.packb({"version": TRANSFER_VERSION, "start": start, "layers": encoded}, use_bin_type=True)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise TransferError(message)


def _decode(name: str, record) -> torch.Tensor:
    _require(isinstance(record, dict) and set(record) == {"dtype", "shape", "data"}, f"tensor {name}: malformed record")
    _require(record["dtype"] in TENSOR_DTYPES, f"tensor {name}: unknown dtype {record['dtype']!r}")
    shape = record["shape"]
    valid_shape = isinstance(shape, list) and len(shape) <= 4 and all(isinstance(d, int) and d >= 0 for d in shape)
    _require(valid_shape, f"tensor {name}: bad shape {shape!r}")
    dtype = TENSOR_DTYPES[record["dtype"]]
    data = record["data"]
    expected = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    _require(isinstance(data, bytes), f"tensor {name}: data must be bytes")
    _require(len(data) == expected, f"tensor {name}: {len(data)} bytes, shape {shape} needs {expected}")
    storage = np.frombuffer(data, dtype=np.int16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype)
    tensor = torch.from_numpy(storage.copy()).reshape(shape)
    tensor = tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor
    _require(bool(torch.isfinite(tensor.float()).all()), f"tensor {name} contains NaN or infinite values")
    return tensor


def unpack_layers(payload: bytes) -> PackedSpan:
    """Parse and validate a payload from :func:`pack_layers`; raises :class:`TransferError`."""
    _require(isinstance(payload, (bytes, bytearray)), "payload must be bytes")
    try:
        message = msgpack.unpackb(payload, raw=False)
    except Exception as error:  # msgpack raises several unrelated types on garbage
        raise TransferError(f"payload is not valid msgpack: {error}") from None
    _require(isinstance(message, dict) and set(message) == {"version", "start", "layers"}, "payload must have version, start and layers")
    _require(message["version"] == TRANSFER_VERSION, f"payload has version {message['version']!r}, this peer reads {TRANSFER_VERSION}")
    _require(isinstance(message["start"], int) and message["start"] >= 0, "start must be a non-negative integer")
    layers = message["layers"]
    _require(isinstance(layers, list) and 0 < len(layers) <= MAX_LAYERS, f"layers must be a list of 1..{MAX_LAYERS}")
    decoded = []
    for index, layer in enumerate(layers):
        _require(isinstance(layer, dict) and 0 < len(layer) <= MAX_TENSORS_PER_LAYER, f"layer {index}: malformed")
        _require(all(isinstance(name, str) for name in layer), f"layer {index}: tensor names must be strings")
        decoded.append({name: _decode(f"{index}.{name}", record) for name, record in layer.items()})
    return PackedSpan(message["start"], tuple(decoded), len(payload))


def _factored_modules(state: dict[str, torch.Tensor], first_part: str) -> set[str]:
    return {name[: -len(first_part) - 1] for name in state if name.endswith("." + first_part)}


def load_packed_layers(layers: nn.ModuleList, packed: PackedSpan, assign: bool = False) -> None:
    """Load ``packed`` into ``layers`` (same architecture), turning factored projections into LowRankLinear.

    ``assign=True`` takes the received tensors as the parameters (for layers built on the meta
    device: no dense buffer is ever allocated for a projection that arrives as factors).
    """
    _require(len(layers) == len(packed.layers), f"payload has {len(packed.layers)} layers, the span has {len(layers)}")
    for index, (layer, state) in enumerate(zip(layers, packed.layers)):
        for parts, build in ((FACTOR_NAMES, _svd_module), (INTERPOLATIVE_NAMES, _interpolative_module)):
            for module_name in _factored_modules(state, parts[0]):
                target = _target(layer, index, module_name)
                missing = [part for part in parts if f"{module_name}.{part}" not in state]
                _require(not missing, f"layer {index}: {module_name} lacks factor(s) {missing}")
                tensors = [state[f"{module_name}.{part}"] for part in parts]
                module = build(index, module_name, tensors, state.get(f"{module_name}.bias"), target)
                parent, _, child = module_name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, module)
        try:
            layer.load_state_dict(state, strict=True, assign=assign)
        except RuntimeError as error:
            raise TransferError(f"layer {index}: state does not match the architecture: {error}") from None


def _target(layer: nn.Module, index: int, module_name: str) -> nn.Module:
    try:
        return layer.get_submodule(module_name)
    except AttributeError:
        raise TransferError(f"layer {index}: no module {module_name!r}") from None


def _svd_module(index: int, name: str, tensors: list[torch.Tensor], bias, target: nn.Module) -> LowRankLinear:
    factors = SvdFactors(*tensors)
    _check_factors(index, name, factors, target)
    return LowRankLinear(factors, bias)


def _interpolative_module(index: int, name: str, tensors: list[torch.Tensor], bias, target: nn.Module) -> InterpolativeLinear:
    rows, mix, order = tensors
    in_features, out_features = getattr(target, "in_features", None), getattr(target, "out_features", None)
    _require(rows.dim() == 2 and mix.dim() == 2 and order.dim() == 1, f"layer {index}: {name} rows, mix, order must be 2-D, 2-D, 1-D")
    _require(rows.is_floating_point() and mix.is_floating_point() and order.dtype == torch.int64,
             f"layer {index}: {name} rows and mix must be floating point, order int64")
    rank = rows.shape[0]
    fits = rows.shape[1] == in_features and mix.shape == (out_features - rank, rank) and order.shape == (out_features,)
    shapes = f"{tuple(rows.shape)}, {tuple(mix.shape)}, {tuple(order.shape)}"
    _require(fits, f"layer {index}: {name} interpolative shapes {shapes} do not fit [{out_features}, {in_features}]")
    try:
        return InterpolativeLinear(rows, mix, order, bias)
    except ValueError as error:
        raise TransferError(f"layer {index}: {name}: {error}") from None


def _check_factors(index: int, name: str, factors: SvdFactors, target: nn.Module) -> None:
    in_features, out_features = getattr(target, "in_features", None), getattr(target, "out_features", None)
    U, S, Vh = factors.U, factors.S, factors.Vh
    _require(U.dim() == 2 and S.dim() == 1 and Vh.dim() == 2, f"layer {index}: {name} factors must be 2-D, 1-D, 2-D")
    fits = U.shape == (out_features, S.shape[0]) and Vh.shape == (S.shape[0], in_features)
    shapes = f"{tuple(U.shape)}, {tuple(S.shape)}, {tuple(Vh.shape)}"
    _require(fits, f"layer {index}: {name} factor shapes {shapes} do not fit [{out_features}, {in_features}]")


def _dense_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The layer's state with every low-rank projection replaced by its reconstructed dense weight."""
    state = dict(layer.state_dict())
    for name, module in layer.named_modules():
        if isinstance(module, (LowRankLinear, InterpolativeLinear)):
            for part in FACTOR_NAMES if isinstance(module, LowRankLinear) else INTERPOLATIVE_NAMES:
                del state[f"{name}.{part}"]
            state[f"{name}.weight"] = module.dense_weight()
    return state


def dense_payload_bytes(layers: nn.ModuleList, start: int = 0) -> int:
    """Bytes of the same span packed with every projection dense (what a dense transfer sends)."""
    dense_layers = [{name: _encode(tensor) for name, tensor in _dense_state(layer).items()} for layer in layers]
    return len(msgpack.packb({"version": TRANSFER_VERSION, "start": start, "layers": dense_layers}, use_bin_type=True))


def transfer_size(layers: nn.ModuleList, start: int = 0) -> TransferSize:
    """Bytes of the packed span against the same span packed with every projection dense."""
    return TransferSize(len(pack_layers(layers, start)), dense_payload_bytes(layers, start))
