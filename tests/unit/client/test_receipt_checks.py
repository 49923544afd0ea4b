"""A client's receipt checks on one chained step, and what an audited session keeps (pure, no network)."""

from __future__ import annotations

import pytest
import torch

from efedllm.client.audit import SessionAudit, audit_request, outputs_with_receipts
from efedllm.common.errors import RecordError
from efedllm.common.receipts import ReceiptSigner, StepReceipt, extend_history, session_origin, tensor_digest
from efedllm.common.spans import Span
from efedllm.dht.identity import Identity, certify_receipt_key
from efedllm.protocol import codec
from efedllm.protocol.messages import Hop, StepRequest

HOPS = [Hop("peerA", Span(0, 10), "sa"), Hop("peerB", Span(10, 20), "sb")]


def _hidden(seed: int) -> list:
    return codec.encode_hidden(torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(seed)), "float32")


def _step(signers, sent, outputs, position=0):
    receipts, inputs = [], sent
    for hop, signer, output in zip(HOPS, signers, outputs):
        digest = tensor_digest(inputs)
        receipts.append(signer.sign(StepReceipt(hop.peer_id, hop.session_id, hop.span, position, 1, 3, "float32", digest,
                                                tensor_digest(output), extend_history(session_origin(hop.session_id),
                                                                                      position, digest))))
        inputs = output
    return tuple(receipts)


def test_a_consistent_step_gives_the_last_output_and_an_audit_keeps_every_hop():
    signers, sent, outputs = [ReceiptSigner(), ReceiptSigner()], _hidden(0), [_hidden(1), _hidden(2)]
    audit = SessionAudit()
    for hop, signer in zip(HOPS, signers):
        audit.add_hop(hop, certify_receipt_key(Identity.generate(), signer.public_bytes, "float32", 1.0))
    final = outputs_with_receipts(HOPS, 0, sent, _step(signers, sent, outputs), outputs[0] + outputs[1], "float32", audit)
    assert final == outputs[1]
    requests = audit.requests("m")
    assert [server for server, _, _ in requests] == ["peerA", "peerB"]
    _, request, tensors = requests[1]
    assert request.hidden_states == 2 and len(tensors) == 2  # its input (hop A's output) and its output


def test_receipts_that_do_not_match_the_bytes_or_the_step_are_refused():
    signers, sent, outputs = [ReceiptSigner(), ReceiptSigner()], _hidden(0), [_hidden(1), _hidden(2)]
    receipts = _step(signers, sent, outputs)
    with pytest.raises(RecordError, match="another output"):
        outputs_with_receipts(HOPS, 0, sent, receipts, outputs[0] + _hidden(3), "float32", None)
    with pytest.raises(RecordError, match="position"):
        outputs_with_receipts(HOPS, 4, sent, receipts, outputs[0] + outputs[1], "float32", None)
    with pytest.raises(RecordError, match="receipts"):
        outputs_with_receipts(HOPS, 0, sent, receipts[:1], outputs[0] + outputs[1], "float32", None)


def test_an_audited_session_refuses_a_receipt_its_hop_did_not_sign():
    signers, sent, outputs = [ReceiptSigner(), ReceiptSigner()], _hidden(0), [_hidden(1), _hidden(2)]
    audit = SessionAudit()
    for hop in HOPS:  # certificates of other receipt keys than the ones that signed
        audit.add_hop(hop, certify_receipt_key(Identity.generate(), ReceiptSigner().public_bytes, "float32", 1.0))
    with pytest.raises(RecordError, match="not signed"):
        outputs_with_receipts(HOPS, 0, sent, _step(signers, sent, outputs), outputs[0] + outputs[1], "float32", audit)


def test_a_hidden_state_sent_twice_travels_once_in_an_audit():
    signer = ReceiptSigner()
    audit = SessionAudit()
    audit.add_hop(HOPS[0], certify_receipt_key(Identity.generate(), signer.public_bytes, "float32", 1.0))
    same = _hidden(5)
    receipt = _step([signer], same, [same])[0]  # an (odd) step whose output is its input
    audit.record(receipt, same, same)
    request, tensors = audit_request("m", audit.traces["sa"])
    assert request.hidden_states == 1 and len(tensors) == 1


def test_step_requests_carry_receipts_only_when_asked_for():
    receipt = _step([ReceiptSigner()], _hidden(0), [_hidden(1)])[0]
    with pytest.raises(RecordError, match="asks for none"):
        StepRequest("s", Span(0, 10), 0, upstream_receipts=(receipt,))
    step = StepRequest("s", Span(0, 10), 0, next_hops=(HOPS[1],), receipts=True)
    assert step.for_next_hop((receipt,)).upstream_receipts == (receipt,)
    assert StepRequest("s", Span(0, 10), 0, next_hops=(HOPS[1],)).for_next_hop((receipt,)).upstream_receipts == ()
    assert StepRequest.from_wire(step.for_next_hop((receipt,)).to_wire()).upstream_receipts == (receipt,)
