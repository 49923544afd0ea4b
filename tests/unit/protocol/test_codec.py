"""Hidden states and metadata on the wire: every format, and what a decoder refuses."""

from __future__ import annotations

import pytest
import torch
from hivemind.proto import runtime_pb2

from efedllm.common.errors import RecordError
from efedllm.common.spans import Span
from efedllm.protocol import codec
from efedllm.protocol.messages import Reply, StepRequest


@pytest.mark.parametrize("wire_format", ["float32", "float16", "bfloat16", "int8"])
def test_wire_formats(wire_format):
    hidden = torch.randn(1, 3, 576) * 10
    decoded = codec.decode_hidden(codec.encode_hidden(hidden, wire_format), wire_format, torch.float32)
    tolerance = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2, "int8": 1e-2}[wire_format]
    assert (decoded - hidden).abs().max() <= tolerance * hidden.abs().max()
    with pytest.raises(RecordError):
        codec.decode_hidden([], wire_format, torch.float32)
    # what goes on the wire: 4, 2, 2 bytes per value, int8 one byte plus a float32 scale per token
    expected_bytes = {"float32": 4 * 3 * 576, "float16": 2 * 3 * 576, "bfloat16": 2 * 3 * 576, "int8": 3 * 576 + 4 * 3}
    assert codec.wire_bytes(codec.encode_hidden(hidden, wire_format)) == expected_bytes[wire_format]


def test_metadata_is_bounded_and_must_be_a_mapping():
    with pytest.raises(RecordError, match="exceeds"):
        codec.unpack_metadata(b"\x00" * (codec.MAX_METADATA_BYTES + 1))
    with pytest.raises(RecordError, match="msgpack"):
        codec.unpack_metadata(b"\xc1")
    with pytest.raises(RecordError, match="mapping"):
        codec.unpack_metadata(codec.pack_metadata([1, 2]))


def test_messages_travel_as_protobufs_and_are_read_as_their_kind():
    step = StepRequest("s1", Span(0, 10), 0)
    request = codec.request(step, codec.encode_hidden(torch.zeros(1, 1, 8), "float32"))
    assert isinstance(request, runtime_pb2.ExpertRequest) and codec.read_message(StepRequest, request) == step
    assert codec.read_message(Reply, codec.ok_reply()).ok
    failed = codec.read_message(Reply, codec.error_reply("boom", "peer-b"))
    assert (failed.error, failed.failed_peer) == ("boom", "peer-b")
    with pytest.raises(RecordError, match="reply lacks"):
        codec.read_message(Reply, request)  # a step request is no reply
