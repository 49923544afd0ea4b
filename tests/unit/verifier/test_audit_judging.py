"""Judging audits with the real model: honest sessions are clean, a wrong step is a proven lie, and
nothing a client changes or leaves out can make an honest server look like a liar."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from efedllm.client.audit import HopTrace, audit_request
from efedllm.common.receipts import ReceiptSigner, StepReceipt, extend_history, session_origin, tensor_digest
from efedllm.common.spans import Span
from efedllm.dht.identity import Identity, certify_receipt_key
from efedllm.models.sessions import SpanSessions
from efedllm.models.span import load_span
from efedllm.protocol import codec
from efedllm.verifier.audit import judge_audit
from efedllm.verifier.config import SAME_DTYPE_TOLERANCES

BLOCKS = Span(10, 20)


@pytest.fixture(scope="module")
def server_span():
    return load_span("smollm2-135m", BLOCKS.start, BLOCKS.end)


@pytest.fixture(scope="module")
def identity():
    return Identity.generate()


def _tolerances(dtype):
    return SAME_DTYPE_TOLERANCES


def _session(server_span, identity, steps, corrupt_step=None):
    """A HopTrace of an honest server (but for ``corrupt_step``): ``steps`` are (position, tokens)."""
    signer = ReceiptSigner()
    trace = HopTrace(identity.peer_id, BLOCKS, certify_receipt_key(identity, signer.public_bytes, "float32", 1.0))
    sessions, history, generator = SpanSessions(server_span), session_origin("s1"), torch.Generator().manual_seed(0)
    sessions.open("s1", 64)
    for index, (position, tokens) in enumerate(steps):
        inputs = torch.randn(1, tokens, server_span.hidden_size, generator=generator) * 3
        outputs = sessions.step("s1", inputs, position)  # what a server runs
        if index == corrupt_step:
            outputs = outputs + 0.1 * outputs.norm(dim=-1, keepdim=True) / outputs.shape[-1] ** 0.5 * torch.randn(
                outputs.shape, generator=generator)
        sent, answered = codec.encode_hidden(inputs, "float32"), codec.encode_hidden(outputs, "float32")
        history = extend_history(history, position, tensor_digest(sent))
        receipt = StepReceipt(identity.peer_id, "s1", BLOCKS, position, 1, tokens, "float32", tensor_digest(sent),
                              tensor_digest(answered), history)
        trace.steps.append((signer.sign(receipt), sent, answered))
    return trace


def _judge(trace, full_span):
    request, tensors = audit_request("smollm2-135m", trace)
    return judge_audit(request, tensors, full_span, _tolerances)


def test_an_honest_session_is_clean_and_its_work_counted(server_span, identity, full_span):
    outcome = _judge(_session(server_span, identity, [(0, 5), (5, 1), (6, 1), (7, 1)]), full_span)
    assert outcome.verdict == "clean", outcome.reason
    assert outcome.work == 8 and outcome.span == BLOCKS and outcome.peer_id == identity.peer_id


def test_a_session_that_rewinds_its_cache_is_replayed_as_the_server_held_it(server_span, identity, full_span):
    outcome = _judge(_session(server_span, identity, [(0, 5), (5, 1), (3, 2), (5, 1)]), full_span)
    assert outcome.verdict == "clean", outcome.reason


def test_one_wrong_step_is_a_proven_lie_naming_that_step(server_span, identity, full_span):
    outcome = _judge(_session(server_span, identity, [(0, 5), (5, 1), (6, 1), (7, 1)], corrupt_step=2), full_span)
    assert outcome.verdict == "lie" and outcome.step == 2, outcome


def test_a_client_cannot_frame_an_honest_server(server_span, identity, full_span):
    honest = _session(server_span, identity, [(0, 5), (5, 1), (6, 1)])
    left_out = dataclasses.replace(honest, steps=[honest.steps[0], honest.steps[2]])
    assert _judge(left_out, full_span).verdict == "invalid"
    receipt, sent, answered = honest.steps[1]
    changed = codec.encode_hidden(codec.decode_hidden(answered, "float32", torch.float32) * 2, "float32")
    tampered = dataclasses.replace(honest, steps=[honest.steps[0], (receipt, sent, changed), honest.steps[2]])
    outcome = _judge(tampered, full_span)
    assert outcome.verdict == "invalid" and "bytes" in outcome.reason
    unsigned = dataclasses.replace(honest, steps=[(dataclasses.replace(receipt, position=5), sent, answered)
                                                  for receipt, sent, answered in honest.steps])
    assert _judge(unsigned, full_span).verdict == "invalid"


def test_a_receipt_key_not_vouched_for_by_the_server_proves_nothing(server_span, identity, full_span):
    lying = _session(server_span, identity, [(0, 5), (5, 1)], corrupt_step=1)
    other = Identity.generate()  # a client's own key, passed off as the server's
    forged = certify_receipt_key(other, lying.certificate.receipt_key, "float32", 1.0)
    outcome = _judge(dataclasses.replace(lying, certificate=dataclasses.replace(forged, peer_id=identity.peer_id)),
                     full_span)
    assert outcome.verdict == "invalid" and "another peer's key" in outcome.reason
