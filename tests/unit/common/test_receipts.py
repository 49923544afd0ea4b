"""Step receipts: signatures, digests of exact bytes, the session history chain and the chain check."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from efedllm.common.errors import RecordError
from efedllm.common.receipts import (ReceiptSigner, StepReceipt, check_chain, extend_history, session_origin,
                                     tensor_digest)
from efedllm.common.spans import Span
from efedllm.dht.identity import Identity, certify_receipt_key, check_certificate
from efedllm.protocol import codec


def _hidden(seed: int, tokens: int = 2) -> list:
    return codec.encode_hidden(torch.randn(1, tokens, 8, generator=torch.Generator().manual_seed(seed)), "float32")


def _receipt(signer: ReceiptSigner, peer: str, inputs: list, outputs: list, position: int = 0,
             history: bytes | None = None) -> StepReceipt:
    digest = tensor_digest(inputs)
    history = extend_history(history or session_origin("s1"), position, digest)
    return signer.sign(StepReceipt(peer, "s1", Span(0, 10), position, 1, 2, "float32", digest, tensor_digest(outputs),
                                   history))


def test_a_signed_receipt_verifies_and_any_change_breaks_it():
    signer = ReceiptSigner()
    receipt = _receipt(signer, "peerA", _hidden(0), _hidden(1))
    assert receipt.verify(signer.public_bytes)
    assert StepReceipt.from_wire(receipt.to_wire()).verify(signer.public_bytes)
    assert not dataclasses.replace(receipt, position=1).verify(signer.public_bytes)
    assert not dataclasses.replace(receipt, output_digest=tensor_digest(_hidden(2))).verify(signer.public_bytes)
    assert not receipt.verify(ReceiptSigner().public_bytes)  # another key
    assert not receipt.verify(b"short")


def test_digests_cover_the_exact_bytes_dtype_and_shape():
    assert tensor_digest(_hidden(0)) == tensor_digest(_hidden(0))
    assert tensor_digest(_hidden(0)) != tensor_digest(_hidden(1))
    values = torch.zeros(1, 2, 8)
    assert tensor_digest(codec.encode_hidden(values, "float32")) != tensor_digest(codec.encode_hidden(values, "float16"))
    assert tensor_digest(codec.encode_hidden(values, "float32")) != \
        tensor_digest(codec.encode_hidden(values.reshape(1, 4, 4), "float32"))


def test_history_depends_on_every_step_and_its_order():
    a, b = tensor_digest(_hidden(0)), tensor_digest(_hidden(1))
    origin = session_origin("s1")
    assert origin != session_origin("s2")
    in_order = extend_history(extend_history(origin, 0, a), 2, b)
    assert in_order != extend_history(extend_history(origin, 0, b), 2, a)
    assert in_order != extend_history(origin, 2, b)  # a step left out
    assert in_order != extend_history(extend_history(origin, 0, a), 1, b)  # another position


def test_malformed_receipts_are_rejected():
    receipt = _receipt(ReceiptSigner(), "peerA", _hidden(0), _hidden(1))
    for field, value in (("input_digest", b"x"), ("signature", b"\0" * 10), ("history", "text")):
        wire = receipt.to_wire()
        wire[field] = value
        with pytest.raises(RecordError, match=field):
            StepReceipt.from_wire(wire)


def test_check_chain_accepts_a_consistent_chain_and_names_what_breaks():
    signers, peers = [ReceiptSigner(), ReceiptSigner()], ("peerA", "peerB")
    sent, middle, last = _hidden(0), _hidden(1), _hidden(2)
    receipts = (_receipt(signers[0], "peerA", sent, middle), _receipt(signers[1], "peerB", middle, last))
    outputs = (tensor_digest(middle), tensor_digest(last))
    check_chain(receipts, peers, tensor_digest(sent), outputs)
    with pytest.raises(RecordError, match="not the chain's hop"):
        check_chain(receipts, ("peerA", "peerC"), tensor_digest(sent), outputs)
    with pytest.raises(RecordError, match="another input"):
        check_chain(receipts, peers, tensor_digest(_hidden(9)), outputs)
    with pytest.raises(RecordError, match="another output"):
        check_chain(receipts, peers, tensor_digest(sent), (tensor_digest(middle), tensor_digest(_hidden(9))))
    with pytest.raises(RecordError, match="receipts"):
        check_chain(receipts[:1], peers, tensor_digest(sent), outputs)


def test_a_certificate_binds_the_receipt_key_to_the_identity():
    identity, signer = Identity.generate(), ReceiptSigner()
    certificate = certify_receipt_key(identity, signer.public_bytes, "float32", 1.0)
    check_certificate(certificate, identity.peer_id)
    with pytest.raises(RecordError, match="expected one of"):
        check_certificate(certificate, Identity.generate().peer_id)
    with pytest.raises(RecordError, match="bad signature"):
        check_certificate(dataclasses.replace(certificate, receipt_key=ReceiptSigner().public_bytes))
    with pytest.raises(RecordError, match="bad signature"):
        check_certificate(dataclasses.replace(certificate, dtype="bfloat16"))  # a claimed dtype is signed too
    other = Identity.generate()  # another peer's key cannot vouch for this peer id
    forged = certify_receipt_key(other, signer.public_bytes, "float32", 1.0)
    with pytest.raises(RecordError, match="another peer's key"):
        check_certificate(dataclasses.replace(forged, peer_id=identity.peer_id))
