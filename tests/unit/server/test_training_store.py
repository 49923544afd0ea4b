"""Training requests' pure parts (issue 19): kept forward graphs give the recomputed gradients and are used only
for the very inputs they were made from; the store of kept graphs bounds bytes and age; backward fault modes
parse and corrupt as documented; gradient errors judge zero and tiny gradients against the step's scale;
train receipts bind their signer."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from efedllm.common.receipts import ReceiptSigner, TrainReceipt, train_digest
from efedllm.common.spans import Span
from efedllm.models.adapters import AdapterSpec, TrainableSpan, init_adapters
from efedllm.models.span import load_span
from efedllm.server.faults import GradNoiseFault, GradStaleFault, GradZerosFault, parse_fault
from efedllm.protocol import codec
from efedllm.protocol.messages import Reply, TrainRequest
from efedllm.server.training import KeptForwards, TrainingServicer, activation_bytes
from efedllm.verifier.training_audit import gradient_errors

SPEC = AdapterSpec("lora", rank=2, alpha=4.0)


@pytest.fixture(scope="module")
def trainable():
    return TrainableSpan(load_span("smollm2-135m", 3, 5), SPEC)


def inputs(trainable, seed: int):
    generator = torch.Generator().manual_seed(seed)
    tensors = init_adapters(trainable.adapter_shapes(), SPEC, generator)
    tensors = {name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator) for name, tensor in tensors.items()}
    hidden = torch.randn(2, 5, trainable.span_model.hidden_size, generator=generator)
    return hidden, tensors, torch.randn(hidden.shape, generator=generator)


def test_a_kept_forward_gives_the_recomputed_gradients_and_only_for_its_own_inputs(trainable):
    hidden, tensors, grad_outputs = inputs(trainable, 0)
    outputs, kept = trainable.forward_kept(hidden, tensors)
    assert torch.equal(outputs, trainable.forward(hidden, tensors)) and not outputs.requires_grad
    want_hidden, want = trainable.backward(hidden, tensors, grad_outputs)
    got_hidden, got = trainable.backward(hidden, tensors, grad_outputs, kept)
    assert torch.allclose(got_hidden, want_hidden, atol=1e-6) and all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)
    other_hidden, other, _ = inputs(trainable, 1)
    assert not kept.made_from(other_hidden, tensors) and not kept.made_from(hidden, other)
    _, kept = trainable.forward_kept(hidden, tensors)  # a graph of other inputs is not used: the forward is redone
    redone_hidden, _ = trainable.backward(other_hidden, tensors, grad_outputs, kept)
    assert torch.allclose(redone_hidden, trainable.backward(other_hidden, tensors, grad_outputs)[0], atol=1e-6)


def test_kept_forwards_are_bounded_in_bytes_and_age(trainable, monkeypatch):
    hidden, tensors, _ = inputs(trainable, 0)
    _, kept = trainable.forward_kept(hidden, tensors)
    clock = [1000.0]
    monkeypatch.setattr("efedllm.server.training.time.monotonic", lambda: clock[0])
    store = KeptForwards(max_bytes=100, ttl=60.0, peer_share=1.0)
    store.put(("a", "1"), kept, 60)
    store.put(("a", "2"), kept, 60)  # over the budget: the oldest goes
    assert store.pop(("a", "1")) is None and store.pop(("a", "2")) is kept and len(store) == 0 and store.bytes == 0
    store.put(("a", "3"), kept, 101)  # larger than the whole budget: not kept
    assert len(store) == 0
    store.put(("b", "1"), kept, 10)
    assert store.pop(("a", "1")) is None  # another peer's id never matches
    clock[0] += 30
    store.put(("b", "2"), kept, 10)
    clock[0] += 31
    store.put(("b", "3"), kept, 10)  # putting drops expired entries: ("b", "1") is 61 s old
    assert store.bytes == 20 and store.pop(("b", "1")) is None
    clock[0] += 30
    assert store.pop(("b", "2")) is None and store.pop(("b", "3")) is kept and store.bytes == 0


def test_activation_bytes_grow_with_rows_tokens_and_blocks(trainable):
    config = trainable.span_model.config
    one = activation_bytes(config, 1, 1, 128)
    assert activation_bytes(config, 10, 4, 128) == 40 * one and activation_bytes(config, 1, 1, 256) > 2 * one


def test_backward_fault_modes_parse_and_corrupt_as_documented():
    assert isinstance(parse_fault("grad-noise:0.05"), GradNoiseFault) and parse_fault("grad-noise:0.05").spec == "grad-noise:0.05"
    assert isinstance(parse_fault("grad-zeros"), GradZerosFault) and isinstance(parse_fault("grad-stale"), GradStaleFault)
    for bad, message in (("grad-noise", "needs an argument"), ("grad-noise:-1", "SIGMA must be > 0"),
                         ("grad-zeros:1", "takes no argument"), ("grad-zeros;share=0.5", "rules need")):
        with pytest.raises(ValueError, match=message):
            parse_fault(bad)
    grad_hidden, grads = torch.ones(2, 3, 4), {"a": torch.full((3,), 2.0)}
    noisy_hidden, noisy = GradNoiseFault(0.5, seed=1).corrupt_gradients(grad_hidden, grads)
    assert 0.2 < float((noisy_hidden - grad_hidden).norm() / grad_hidden.norm()) < 0.8
    zero_hidden, zeros = GradZerosFault().corrupt_gradients(grad_hidden, grads)
    assert not zero_hidden.any() and not zeros["a"].any()
    stale = GradStaleFault()
    first, second = {"a": torch.zeros(3)}, {"a": torch.ones(3)}
    assert stale.training_tensors(first, backward=False) is first  # forwards are honest
    assert torch.equal(stale.training_tensors(second, backward=True)["a"], first["a"])  # backwards use the first seen


def test_gradient_errors_judge_zero_and_tiny_gradients_against_the_step_scale():
    big, zero = torch.ones(100), torch.zeros(10)
    assert gradient_errors([big, zero], [big, zero]) == [0.0, 0.0]
    assert gradient_errors([big, zero], [big, zero + 1e-9])[1] < 1e-3  # rounding next to a zero gradient
    assert gradient_errors([big, zero], [big, zero + 1.0])[1] > 1.0
    assert gradient_errors([big], [big * 0])[0] == pytest.approx(1.0)
    assert gradient_errors([big], [torch.ones(99)]) == [float("inf")]
    assert gradient_errors([big], [big * float("nan")]) == [float("inf")]


def test_a_train_receipt_binds_its_signer_and_every_field():
    signer, other = ReceiptSigner(), ReceiptSigner()
    receipt = signer.sign(TrainReceipt("QmPeer", Span(0, 2), True, 2, 5, train_digest(b"meta", []), b"\1" * 16))
    assert receipt.verify(signer.public_bytes) and not receipt.verify(other.public_bytes)
    for change in ({"backward": False}, {"rows": 3}, {"answer_digest": b"\2" * 16}, {"span": Span(0, 3)}):
        assert not dataclasses.replace(receipt, **change).verify(signer.public_bytes), change
    assert train_digest(b"meta", []) != train_digest(b"metb", [])
    assert TrainReceipt.from_wire(receipt.to_wire()) == receipt


def test_one_peer_holds_at_most_its_share_of_kept_forwards(trainable):
    hidden, tensors, _ = inputs(trainable, 0)
    _, kept = trainable.forward_kept(hidden, tensors)
    store = KeptForwards(max_bytes=100, ttl=60.0, peer_share=0.5)
    store.put(("other", "1"), kept, 40)
    for step in range(3):
        store.put(("flood", str(step)), kept, 20)
    assert store.pop(("other", "1")) is kept  # the flooding peer pushed out only its own oldest
    assert store.pop(("flood", "0")) is None and store.pop(("flood", "2")) is kept
    store.put(("flood", "big"), kept, 51)  # more than one peer's share: not kept
    assert len(store) == 1


def test_a_peer_with_two_training_requests_in_flight_is_refused_a_third(trainable):
    hidden, tensors, _ = inputs(trainable, 0)
    release = asyncio.Event()

    async def compute(function, *arguments):
        await release.wait()
        return function(*arguments)

    servicer = TrainingServicer(SimpleNamespace(model=trainable.span_model), compute)
    request = codec.request(TrainRequest(Span(3, 5), "lora", tuple(tensors), rank=2, alpha=4.0, targets=SPEC.targets),
                            codec.encode_tensors([hidden, *tensors.values()]))

    async def scenario():
        first = [asyncio.create_task(servicer.handle(request, "flood")) for _ in range(2)]
        await asyncio.sleep(0.01)
        refused = codec.read_message(Reply, await servicer.handle(request, "flood"))
        other = asyncio.create_task(servicer.handle(request, "other"))  # another peer is not held up by the flood
        release.set()
        answers = [codec.read_message(Reply, answer) for answer in await asyncio.gather(*first, other)]
        return refused, answers

    refused, answers = asyncio.run(scenario())
    assert "already has 2 training requests in flight" in refused.error
    assert all(answer.ok for answer in answers) and not servicer.in_flight
