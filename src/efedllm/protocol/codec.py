"""Hidden states and message metadata as hivemind protobufs (shared by client, server and verifier).

Hidden states travel in the model dtype by default; ``float16``/``bfloat16`` halve the bytes
(bfloat16 as its raw bits in an int16 tensor: hivemind would widen it to float32);
``int8`` sends int8 values with one float32 scale per token (absmax / 127). Metadata is msgpack
of a message from :mod:`efedllm.protocol.messages`. Every decode validates what it reads and
raises :class:`~efedllm.common.errors.RecordError` naming the problem.
"""

from __future__ import annotations

from typing import TypeVar

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from efedllm.common.errors import RecordError
from efedllm.common.records import WireRecord
from efedllm.protocol.messages import Reply

WIRE_FORMATS = ("float32", "bfloat16", "float16", "int8")
MAX_METADATA_BYTES = 64 * 1024
MAX_TENSOR_ELEMENTS = 64 * 1024 * 1024
Message = TypeVar("Message", bound=WireRecord)


def check_wire_format(name: str) -> str:
    if name not in WIRE_FORMATS:
        raise RecordError(f"wire format {name!r} is not one of {list(WIRE_FORMATS)}")
    return name


def encode_hidden(hidden_states: torch.Tensor, wire_format: str) -> list:
    """[batch, tokens, hidden] -> serialised tensors for ``wire_format``."""
    check_wire_format(wire_format)
    if wire_format == "int8":
        scale = hidden_states.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0  # [batch, tokens, 1]
        values = torch.round(hidden_states.float() / scale).clamp(-127, 127).to(torch.int8)
        return [serialize_torch_tensor(values), serialize_torch_tensor(scale)]
    if wire_format == "bfloat16":  # hivemind sends bfloat16 as float32 by default; its raw 2 bytes instead
        return [serialize_torch_tensor(hidden_states.to(torch.bfloat16).view(torch.int16))]
    return [serialize_torch_tensor(hidden_states.to(getattr(torch, wire_format)))]


def hidden_groups(tensors, wire_format: str) -> list[list]:
    """Serialised tensors holding several hidden states one after another -> one list per hidden state."""
    size = 2 if check_wire_format(wire_format) == "int8" else 1
    tensors = list(tensors)
    if not tensors or len(tensors) % size:
        raise RecordError(f"{len(tensors)} tensors are not whole {wire_format} hidden states ({size} tensor(s) each)")
    return [tensors[index:index + size] for index in range(0, len(tensors), size)]


def decode_hidden(tensors, wire_format: str, dtype: torch.dtype) -> torch.Tensor:
    """Serialised tensors -> hidden states in ``dtype``; raises RecordError on anything malformed."""
    check_wire_format(wire_format)
    expected = 2 if wire_format == "int8" else 1
    if len(tensors) != expected:
        raise RecordError(f"{wire_format} hidden states need {expected} tensor(s), got {len(tensors)}")
    for tensor in tensors:
        elements = 1
        for size in tensor.size:
            elements *= size
        if elements > MAX_TENSOR_ELEMENTS:
            raise RecordError(f"tensor of {elements} elements exceeds the limit of {MAX_TENSOR_ELEMENTS}")
    try:
        decoded = [deserialize_torch_tensor(tensor) for tensor in tensors]
    except Exception as error:  # a malformed buffer can fail in numpy or torch in many ways
        raise RecordError(f"cannot decode hidden states: {error}") from None
    if wire_format == "int8":
        values, scale = decoded
        if values.dtype != torch.int8 or scale.shape != values.shape[:-1] + (1,):
            raise RecordError("int8 hidden states need int8 values and one scale per token")
        return (values.float() * scale.float()).to(dtype)
    if wire_format == "bfloat16":
        if decoded[0].dtype != torch.int16:
            raise RecordError(f"hidden states announced as bfloat16 (raw int16 bits) arrived as {decoded[0].dtype}")
        decoded[0] = decoded[0].view(torch.bfloat16)
    if decoded[0].dtype != getattr(torch, wire_format):
        raise RecordError(f"hidden states announced as {wire_format} arrived as {decoded[0].dtype}")
    return decoded[0].to(dtype)


def encode_tensors(tensors: list[torch.Tensor]) -> list:
    """float32 tensors of any shapes (training requests and answers) -> serialised tensors."""
    return [serialize_torch_tensor(tensor.detach().to(torch.float32).contiguous()) for tensor in tensors]


def decode_tensors(tensors, count: int) -> list[torch.Tensor]:
    """Exactly ``count`` serialised float32 tensors -> tensors; RecordError naming what is malformed."""
    tensors = list(tensors)
    if len(tensors) != count:
        raise RecordError(f"expected {count} tensors, got {len(tensors)}")
    if sum(_elements(tensor) for tensor in tensors) > MAX_TENSOR_ELEMENTS:
        raise RecordError(f"tensors of more than {MAX_TENSOR_ELEMENTS} elements in all")
    try:
        decoded = [deserialize_torch_tensor(tensor) for tensor in tensors]
    except Exception as error:  # a malformed buffer can fail in numpy or torch in many ways
        raise RecordError(f"cannot decode tensors: {error}") from None
    for index, tensor in enumerate(decoded):
        if tensor.dtype != torch.float32:
            raise RecordError(f"tensor {index} arrived as {tensor.dtype}, not float32")
    return decoded


def _elements(tensor) -> int:
    elements = 1
    for size in tensor.size:
        elements *= size
    return elements


def pack_metadata(data) -> bytes:
    return msgpack.packb(data, use_bin_type=True)


def unpack_metadata(raw: bytes, max_bytes: int = MAX_METADATA_BYTES) -> dict:
    if len(raw) > max_bytes:
        raise RecordError(f"metadata of {len(raw)} bytes exceeds {max_bytes}")
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as error:
        raise RecordError(f"metadata is not valid msgpack: {error}") from None
    if not isinstance(data, dict):
        raise RecordError("metadata must be a mapping")
    return data


def request(message: WireRecord, tensors=()) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(uid="", tensors=list(tensors), metadata=pack_metadata(message.to_wire()))


def response(message: WireRecord, tensors=()) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(tensors=list(tensors), metadata=pack_metadata(message.to_wire()))


_OK_METADATA = pack_metadata(Reply().to_wire())  # the same on every successful step: packed once


def ok_reply(tensors=()) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(tensors=list(tensors), metadata=_OK_METADATA)


def error_reply(message: str, failed_peer: str | None = None) -> runtime_pb2.ExpertResponse:
    return response(Reply.failure(message, failed_peer))


def read_message(kind: type[Message], protobuf) -> Message:
    """The ``kind`` message in a request's or response's metadata; RecordError when it is anything else."""
    return kind.from_wire(unpack_metadata(protobuf.metadata))


def wire_bytes(tensors) -> int:
    return sum(len(tensor.buffer) for tensor in tensors)
