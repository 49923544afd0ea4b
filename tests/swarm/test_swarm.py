"""A real swarm on 127.0.0.1: chained inference, failover, block selection, bad requests."""

from __future__ import annotations

import threading

import pytest
import torch
from hivemind.proto import runtime_pb2

from efedllm.client.config import RemoteClientConfig
from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.client.routing import MissingBlocksError, choose_route
from efedllm.client.sampling import GenerationConfig
from efedllm.common.spans import Span
from efedllm.dht.records import ServerInfo, ServerState
from efedllm.protocol import codec
from efedllm.protocol.messages import Delivery, OpenSessionRequest, Reply, StepRequest
from efedllm.server.swarm import peer_id_of

pytestmark = pytest.mark.swarm
GREEDY = GenerationConfig(max_new_tokens=24, greedy=True, stop_on_eos=False)
PROMPT = "Name three colours of the rainbow."


def test_chained_and_relayed_match_local(swarm, remote_model, local_pipeline):
    input_ids = local_pipeline.encode_prompt(PROMPT)
    expected = local_pipeline.generate(input_ids, GREEDY).token_ids
    assert remote_model.generate(input_ids, GREEDY).token_ids == expected
    relayed = DistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", swarm.initial_peers, RemoteClientConfig(relay=True))
    try:
        assert relayed.generate(input_ids, GREEDY).token_ids == expected
    finally:
        relayed.shutdown()


def test_float16_wire_keeps_greedy_tokens(swarm, local_pipeline):
    model = DistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", swarm.initial_peers, RemoteClientConfig(wire_format="float16"))
    try:
        input_ids = local_pipeline.encode_prompt(PROMPT)
        assert model.generate(input_ids, GREEDY).token_ids == local_pipeline.generate(input_ids, GREEDY).token_ids
    finally:
        model.shutdown()


def test_two_concurrent_clients(swarm, local_pipeline):
    prompts = ["Say hello in French.", "What is two plus two?"]
    expected = [local_pipeline.generate(local_pipeline.encode_prompt(p), GREEDY).token_ids for p in prompts]
    results = [None, None]

    def generate(index):
        model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", swarm.initial_peers)
        try:
            results[index] = model.generate(model.encode_prompt(prompts[index]), GREEDY).token_ids
        finally:
            model.shutdown()

    threads = [threading.Thread(target=generate, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert results == expected


def _call(model, peer_id, method, metadata, tensors=()) -> Reply:
    """A raw call with any metadata (a message's ``to_wire()``, or something malformed); the server's reply."""
    stub = model.stub(peer_id).stub
    request = runtime_pb2.ExpertRequest(tensors=list(tensors), metadata=codec.pack_metadata(metadata))
    return codec.read_message(Reply, model.run(getattr(stub, method)(request)))


def _delivered_step_error(model, peer_id, step: StepRequest, tensors):
    """A step with direct delivery is acknowledged before it computes: a failure arrives by delivery."""
    step_id = "bad-delivered-step"
    delivered = StepRequest(step.session_id, step.span, step.position, step.wire_format, (), Delivery(model.peer_id, step_id))
    model.run(_async(model.delivery.expect, step_id, (peer_id,)))
    try:
        reply = _call(model, peer_id, "rpc_step", delivered.to_wire(), tensors)
        assert reply.ok, reply
        report, _ = model.run(model.delivery.wait(step_id, 30.0))
    finally:
        model.run(_async(model.delivery.forget, step_id))
    return report


async def _async(function, *args):
    return function(*args)  # DeliveryServicer.expect needs the client's event loop


def test_bad_requests_get_errors_and_server_keeps_serving(swarm, remote_model, local_pipeline):
    peer = next(info.peer_id for info in remote_model.view.servers.values() if info.span == Span(0, 10))
    hidden = torch.randn(1, 2, 576)
    good_open = OpenSessionRequest("bad-inputs", Span(0, 10), 8).to_wire()
    assert _call(remote_model, peer, "rpc_open_session", good_open).ok
    cases = {
        "unknown session": (StepRequest("nope", Span(0, 10), 0).to_wire(), codec.encode_hidden(hidden, "float32")),
        "out of order": (StepRequest("bad-inputs", Span(0, 10), 5).to_wire(), codec.encode_hidden(hidden, "float32")),
        "hidden size": (StepRequest("bad-inputs", Span(0, 10), 0).to_wire(), codec.encode_hidden(torch.randn(1, 2, 7), "float32")),
        "max_length": (StepRequest("bad-inputs", Span(0, 10), 0).to_wire(), codec.encode_hidden(torch.randn(1, 9, 576), "float32")),
        "NaN": (StepRequest("bad-inputs", Span(0, 10), 0).to_wire(), codec.encode_hidden(torch.full((1, 1, 576), float("nan")), "float32")),
        "lacks field": ({"session_id": "bad-inputs"}, ()),
        "version": ({**StepRequest("bad-inputs", Span(0, 10), 0).to_wire(), "version": 99}, ()),
        "need 1 tensor": (StepRequest("bad-inputs", Span(0, 10), 0).to_wire(), ()),
        "arrived as": (StepRequest("bad-inputs", Span(0, 10), 0, "float16").to_wire(), codec.encode_hidden(hidden, "float32")),
    }
    for expected_message, (metadata, tensors) in cases.items():
        reply = _call(remote_model, peer, "rpc_step", metadata, tensors)
        assert not reply.ok and expected_message in reply.error, (expected_message, reply)
    oversized = _call(remote_model, peer, "rpc_open_session", {**good_open, "session_id": "x" * 1000})
    assert not oversized.ok and "longer than" in oversized.error
    delivered_error = _delivered_step_error(remote_model, peer, StepRequest("bad-inputs", Span(0, 10), 0),
                                            codec.encode_hidden(torch.randn(1, 9, 576), "float32"))
    assert "max_length" in delivered_error.reply.error and delivered_error.reply.failed_peer == peer, delivered_error
    garbage = remote_model.run(remote_model.stub(peer).stub.rpc_step(
        runtime_pb2.ExpertRequest(metadata=b"\xc1\xff not msgpack")))
    assert "msgpack" in codec.read_message(Reply, garbage).error
    input_ids = local_pipeline.encode_prompt(PROMPT)
    assert remote_model.generate(input_ids, GREEDY).token_ids == local_pipeline.generate(input_ids, GREEDY).token_ids


def test_num_blocks_fills_thinnest_span_and_failover_after_sigkill(swarm, local_pipeline):
    """A spare server picks the thinnest window; killing the first hop, then a middle hop, in the
    middle of a generation changes no token, and each loss is reported at once (one failover each),
    not found by waiting out the request timeout. The first hop's loss the client sees itself; the
    middle hop's is reported by the first hop, which the client does not take on trust: the next
    step is relayed, and the dead peer is banned only if the client's own reopen tries it."""
    swarm.start_server(num_blocks=10, extra=["--no-rebalance"])
    records = swarm.wait_until_online(4)
    spans = sorted(info.span for info in records.values())
    assert spans == [Span(0, 10), Span(0, 10), Span(10, 20), Span(20, 30)]  # every block was covered once: leftmost
    swarm.start_server("10:20", extra=["--no-rebalance"])
    swarm.wait_until_online(5)
    input_ids = local_pipeline.encode_prompt(PROMPT)
    greedy = GenerationConfig(max_new_tokens=32, greedy=True, stop_on_eos=False)
    expected = local_pipeline.generate(input_ids, greedy).token_ids

    # a lost step found by the timeout would relay the next step to find the culprit: 2 failovers per kill
    model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", swarm.initial_peers,
                                                       RemoteClientConfig(request_timeout=60.0))
    try:
        with model.inference_session(max_length=input_ids.shape[1] + 32) as session:
            tokens, step_ids, killed = [], input_ids, []
            for index in range(32):
                if index in (10, 20):  # the first hop (the client's stream to it breaks), then the middle one
                    killed.append(session.route[0 if index == 10 else 1].peer_id)
                    swarm.kill(next(server for server in swarm.servers if peer_id_of(server) == killed[-1]))
                hidden = session.step(local_pipeline.parts.embed(step_ids))
                token = int(local_pipeline.parts.logits(hidden[:, -1:])[0, -1].argmax())
                tokens.append(token)
                step_ids = torch.tensor([[token]])
            assert session.failovers == 2 and not set(killed) & {hop.peer_id for hop in session.route}
            # the first hop's loss the client saw itself; the middle hop's was only reported by another peer, so
            # it is banned only if the client's own reopen tried it: either way no live server is banned
            assert killed[0] in model.view.banned and model.view.banned <= set(killed)
        assert tokens == expected
    finally:
        model.shutdown()


def test_no_chain_names_missing_blocks():
    info = ServerInfo("p", "m", Span(0, 10), ServerState.ONLINE, 10.0, 100, 1, "k", "0")
    with pytest.raises(MissingBlocksError, match="10-29"):
        choose_route([info], 30)
