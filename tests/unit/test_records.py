from __future__ import annotations

import pytest
import torch

from efedllm import wire
from efedllm.records import (DeliveredStep, Delivery, Hop, RecordError, ServerInfo, ServerState, Span, StepRequest,
                             parse_spans)


def test_span_parsing_and_errors():
    assert parse_spans("0:10,10:30") == [Span(0, 10), Span(10, 30)]
    for bad in ("0-10", "5:5", "a:b", "0:10,11:20"):
        with pytest.raises(RecordError):
            parse_spans(bad)


def test_server_record_round_trip_and_strictness():
    info = ServerInfo("peer", "m", Span(0, 10), ServerState.ONLINE, 12.5, 100, 4, "key", "0.1.0")
    assert ServerInfo.from_wire(info.to_wire()) == info
    for change, message in [({"version": 2}, "version 2"), ({"state": "weird"}, "state"),
                            ({"throughput": float("nan")}, "finite"), ({"extra": 1}, "unknown field")]:
        with pytest.raises(RecordError, match=message):
            ServerInfo.from_wire({**info.to_wire(), **change})
    with pytest.raises(RecordError, match="lacks"):
        ServerInfo.from_wire({k: v for k, v in info.to_wire().items() if k != "span"})


def test_step_request_round_trip():
    step = StepRequest("s1", Span(0, 10), 3, "int8", (Hop("peer", Span(10, 30), "s2"),))
    assert StepRequest.from_wire(step.to_wire()) == step
    with pytest.raises(RecordError, match="session_id"):
        StepRequest.from_wire({**step.to_wire(), "session_id": ""})
    delivered = StepRequest("s1", Span(0, 10), 3, "int8", step.next_hops, Delivery("client", "step-1"))
    assert StepRequest.from_wire(delivered.to_wire()) == delivered
    for bad in (["client"], ["client", ""], "client", [1, "step"]):
        with pytest.raises(RecordError, match="deliver"):
            StepRequest.from_wire({**delivered.to_wire(), "deliver_to": bad})
    with pytest.raises(RecordError, match="version 1"):
        StepRequest.from_wire({**delivered.to_wire(), "version": 1})


def test_delivered_step_round_trip_and_strictness():
    for delivered in (DeliveredStep("step-1"), DeliveredStep("step-1", "hop failed", "peer-b")):
        assert DeliveredStep.from_wire(delivered.to_wire()) == delivered
    with pytest.raises(RecordError, match="error"):
        DeliveredStep.from_wire({**DeliveredStep("s").to_wire(), "error": 3})
    with pytest.raises(RecordError, match="unknown field"):
        DeliveredStep.from_wire({**DeliveredStep("s").to_wire(), "tensors": []})


@pytest.mark.parametrize("wire_format", ["float32", "float16", "bfloat16", "int8"])
def test_wire_formats(wire_format):
    hidden = torch.randn(1, 3, 576) * 10
    decoded = wire.decode_hidden(wire.encode_hidden(hidden, wire_format), wire_format, torch.float32)
    tolerance = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2, "int8": 1e-2}[wire_format]
    assert (decoded - hidden).abs().max() <= tolerance * hidden.abs().max()
    with pytest.raises(RecordError):
        wire.decode_hidden([], wire_format, torch.float32)
    # what goes on the wire: 4, 2, 2 bytes per value, int8 one byte plus a float32 scale per token
    expected_bytes = {"float32": 4 * 3 * 576, "float16": 2 * 3 * 576, "bfloat16": 2 * 3 * 576, "int8": 3 * 576 + 4 * 3}
    assert wire.wire_bytes(wire.encode_hidden(hidden, wire_format)) == expected_bytes[wire_format]
