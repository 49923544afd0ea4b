"""Messages between peers: round trips, strict parsing, versions."""

from __future__ import annotations

import pytest

from efedllm.common.errors import RecordError
from efedllm.common.spans import Span
from efedllm.protocol.messages import (
    CloseSessionRequest,
    DeliveredStep,
    Delivery,
    Hop,
    OpenSessionRequest,
    Reply,
    StepRequest,
    WeightsHeader,
)


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
    for delivered in (DeliveredStep("step-1"), DeliveredStep("step-1", Reply.failure("hop failed", "peer-b"))):
        assert DeliveredStep.from_wire(delivered.to_wire()) == delivered
    with pytest.raises(RecordError, match="error"):
        DeliveredStep.from_wire({**DeliveredStep("s").to_wire(), "reply": {**Reply().to_wire(), "error": 3}})
    with pytest.raises(RecordError, match="unknown field"):
        DeliveredStep.from_wire({**DeliveredStep("s").to_wire(), "tensors": []})


def test_hops_are_validated_when_built_not_only_when_read():
    with pytest.raises(RecordError, match="hop.session_id"):
        Hop("peer", Span(0, 10), "")
    with pytest.raises(RecordError, match="hop.span"):
        Hop("peer", [0, 10], "s1")
    with pytest.raises(RecordError, match=r"next_hops\[\] must be of type hop"):
        StepRequest("s1", Span(0, 10), 0, next_hops=(("peer", [10, 30], "s2"),))


def test_the_next_hops_request_carries_the_rest_of_the_chain():
    rest = (Hop("b", Span(10, 20), "sb"), Hop("c", Span(20, 30), "sc"))
    step = StepRequest("sa", Span(0, 10), 5, "float16", rest, Delivery("client", "step-1"))
    following = step.for_next_hop()
    assert following == StepRequest("sb", Span(10, 20), 5, "float16", rest[1:], Delivery("client", "step-1"))
    assert following.for_next_hop().next_hops == ()


def test_replies_are_typed_and_errors_are_bounded():
    assert Reply().ok and Reply.from_wire(Reply().to_wire()) == Reply()
    failed = Reply.failure("x" * 10_000, "peer-b")
    assert not failed.ok and len(failed.error) == 4096 and failed.failed_peer == "peer-b"
    assert Reply.from_wire(failed.to_wire()) == failed
    with pytest.raises(RecordError, match="unknown field"):
        Reply.from_wire({**Reply().to_wire(), "ok": True})  # the untyped envelope of wire version 2
    with pytest.raises(RecordError, match="reply has version 2"):
        Reply.from_wire({**Reply().to_wire(), "version": 2})


@pytest.mark.parametrize("message", [
    OpenSessionRequest("s1", Span(0, 10), 64),
    CloseSessionRequest("s1"),
    WeightsHeader(Span(0, 10), "float32", 100, 200, None),
    WeightsHeader(Span(0, 10), "bfloat16", 100, 200, {"ratio": 0.6}),
])
def test_every_message_round_trips(message):
    assert type(message).from_wire(message.to_wire()) == message
    with pytest.raises(RecordError, match="lacks"):
        type(message).from_wire({key: value for key, value in message.to_wire().items() if key != "version"})


def test_close_session_needs_a_session_id():
    for bad in ({"version": 3}, {"version": 3, "session_id": 7}, {"version": 3, "session_id": ""}):
        with pytest.raises(RecordError):
            CloseSessionRequest.from_wire(bad)


def test_a_step_whose_chain_visits_a_peer_twice_is_refused():
    loop = (Hop("A", Span(10, 20), "s2"), Hop("B", Span(20, 30), "s3"), Hop("A", Span(10, 20), "s4"))
    with pytest.raises(RecordError, match="more than once"):
        StepRequest("s1", Span(0, 10), 0, "float32", loop)
    wire = StepRequest("s1", Span(0, 10), 0, "float32", loop[:2]).to_wire()
    wire["next_hops"].append(wire["next_hops"][0])
    with pytest.raises(RecordError, match="more than once"):
        StepRequest.from_wire(wire)


def test_a_peer_is_believed_about_itself_only():
    assert Reply.failure("boom").believed_from("B") == Reply("boom", "B")
    assert Reply.failure("boom", "B").believed_from("B") == Reply("boom", "B")
    accusation = Reply.failure("next hop C failed", "C").believed_from("B")
    assert accusation.failed_peer is None and "as B reports of C" in accusation.error
