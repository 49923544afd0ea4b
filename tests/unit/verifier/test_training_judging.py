"""Judging training audits offline (verifier/training_audit.py) against answers the real training servicer
signed: honest forwards and backwards are clean, each backward fault mode and a corrupt training forward are
lies, an answer the server signed malformed is a lie, evidence edited by the client or signed by another key
proves nothing."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from efedllm.common.receipts import ReceiptSigner, tensor_digest
from efedllm.common.spans import Span
from efedllm.dht.identity import Identity, certify_receipt_key
from efedllm.models.adapters import AdapterSpec, TrainableSpan, init_adapters
from efedllm.models.span import load_span
from efedllm.protocol import codec
from efedllm.protocol.audit import TrainAuditRequest
from efedllm.protocol.messages import Reply, TrainRequest
from efedllm.server.faults import FaultMode, parse_fault
from efedllm.server.training import TrainingServicer
from efedllm.verifier.config import SAME_DTYPE_GRADIENT_TOLERANCE, SAME_DTYPE_TOLERANCES
from efedllm.verifier.training_audit import TrainingJudge

BLOCKS = Span(10, 12)
SPEC = AdapterSpec("lora", rank=2, alpha=4.0)


class ForwardNoise(FaultMode):
    """A corrupt training forward: computed with other tensors than the client sent."""

    def training_tensors(self, tensors, backward):
        return tensors if backward else {name: tensor * 3 for name, tensor in tensors.items()}


@pytest.fixture(scope="module")
def server_span():
    return load_span("smollm2-135m", BLOCKS.start, BLOCKS.end)


@pytest.fixture(scope="module")
def judge(full_span):
    return TrainingJudge(full_span, lambda dtype: SAME_DTYPE_TOLERANCES, lambda dtype: SAME_DTYPE_GRADIENT_TOLERANCE)


@pytest.fixture(scope="module")
def identity():
    return Identity.generate()


def answered(server_span, identity, backward: bool, fault: FaultMode | None = None, seed: int = 0):
    """(audit request, its tensors) of one training request answered by the real servicer, signed."""
    signer = ReceiptSigner()
    certificate = certify_receipt_key(identity, signer.public_bytes, "float32", 1.0)

    async def compute(function, *arguments):
        return function(*arguments)

    servicer = TrainingServicer(SimpleNamespace(model=server_span), compute, fault=fault, signer=signer,
                                certificate=certificate, peer_id=identity.peer_id)
    generator = torch.Generator().manual_seed(seed)
    tensors = init_adapters(TrainableSpan(server_span, SPEC, BLOCKS).adapter_shapes(), SPEC, generator)
    tensors = {name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator) for name, tensor in tensors.items()}
    hidden = torch.randn(2, 6, server_span.hidden_size, generator=generator)
    payload = [hidden, torch.randn(hidden.shape, generator=generator)] if backward else [hidden]
    train = TrainRequest(BLOCKS, "lora", tuple(tensors), backward, 2, 4.0, SPEC.targets, receipts=True)
    request = codec.request(train, codec.encode_tensors([*payload, *tensors.values()]))
    answer = asyncio.run(servicer.handle(request, "client"))
    reply = codec.read_message(Reply, answer)
    assert reply.ok, reply.error
    audit = TrainAuditRequest("smollm2-135m", reply.certificate, reply.train_receipt, request.metadata,
                              len(request.tensors), len(answer.tensors))
    return audit, [*request.tensors, *answer.tensors]


@pytest.mark.parametrize("backward", [False, True])
def test_honest_training_answers_are_clean_and_credited(judge, server_span, identity, backward):
    outcome = judge.judge(*answered(server_span, identity, backward))
    assert outcome.verdict == "clean", outcome.reason
    assert outcome.peer_id == identity.peer_id and outcome.work == 2 * 6 * (2 if backward else 1)


@pytest.mark.parametrize("fault", ["grad-noise:0.01", "grad-zeros", "grad-stale"])
def test_each_backward_fault_mode_is_a_lie(judge, server_span, identity, fault):
    mode = parse_fault(fault)
    if fault == "grad-stale":
        answered(server_span, identity, False, mode, seed=1)  # the adapter it remembers: an earlier step's
    outcome = judge.judge(*answered(server_span, identity, True, mode))
    assert outcome.verdict == "lie" and "gradients are off" in outcome.reason, outcome


def test_a_corrupt_training_forward_is_a_lie(judge, server_span, identity):
    outcome = judge.judge(*answered(server_span, identity, False, ForwardNoise()))
    assert outcome.verdict == "lie" and "forward does not follow" in outcome.reason, outcome


def test_edited_or_foreign_evidence_proves_nothing_and_a_malformed_signed_answer_is_a_lie(judge, server_span, identity):
    audit, tensors = answered(server_span, identity, True)
    request_count = audit.request_tensors
    zeroed = tensors[request_count]
    zeroed = type(zeroed)(dtype=zeroed.dtype, size=list(zeroed.size), buffer=bytes(len(zeroed.buffer)))
    edited = [*tensors[:request_count], zeroed, *tensors[request_count + 1:]]
    assert judge.judge(audit, edited).verdict == "invalid"
    other = certify_receipt_key(Identity.generate(), ReceiptSigner().public_bytes, "float32", 1.0)
    assert judge.judge(dataclasses.replace(audit, certificate=other), tensors).verdict == "invalid"
    assert judge.judge(dataclasses.replace(audit, request_metadata=audit.request_metadata + b"x"), tensors).verdict == "invalid"
    assert judge.judge(audit, tensors[:-1]).verdict == "invalid"
    # a server that signs an answer with a tensor too few: its own signature proves the lie
    signer = ReceiptSigner()
    certificate = certify_receipt_key(identity, signer.public_bytes, "float32", 1.0)
    short = tensors[:-1]
    receipt = signer.sign(dataclasses.replace(audit.receipt, answer_digest=tensor_digest(short[request_count:])))
    lie = judge.judge(dataclasses.replace(audit, certificate=certificate, receipt=receipt,
                                          answer_tensors=audit.answer_tensors - 1), short)
    assert lie.verdict == "lie" and "malformed" in lie.reason, lie
