"""Issue 15's attacks, each tried by a real attacking peer against a real swarm on 127.0.0.1.

Each test asserts that the attack gets a clear error or has no effect, that the honest client still
gets the local pipeline's tokens, and that no honest server is banned for it.
"""

from __future__ import annotations

import time
import uuid

import psutil
import pytest
import torch
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from efedllm.client.routing import per_block_seconds
from efedllm.client.sampling import GenerationConfig
from efedllm.common.spans import Span
from efedllm.dht.evidence import evidence_in, evidence_key
from efedllm.dht.records import ServerInfo, ServerState, SpotCheckEvidence
from efedllm.dht.servers import block_key
from efedllm.dht.signed import store_signed
from efedllm.protocol import codec
from efedllm.protocol.messages import Delivery, Hop, OpenSessionRequest, Reply, StepRequest
from efedllm.protocol.service import HopFailure
from efedllm.server.swarm import peer_id_of
from efedllm.verifier.config import VerifierConfig
from efedllm.verifier.node import Verifier, VerifierNodeConfig
from tests.adversarial.conftest import LIAR_THROUGHPUT

pytestmark = pytest.mark.swarm
MODEL = "smollm2-135m"
PROMPT = "Name three colours of the rainbow."
NEW_TOKENS = 24
GREEDY = GenerationConfig(max_new_tokens=NEW_TOKENS, greedy=True, stop_on_eos=False)


def _peer(model, span: Span, liar: bool = False) -> str:
    model.view.refresh()
    return next(info.peer_id for info in model.view.servers.values()
                if info.span == span and (info.throughput >= LIAR_THROUGHPUT) == liar)


def _hidden(rows: int = 1, tokens: int = 1) -> list:
    return codec.encode_hidden(torch.randn(rows, tokens, 576), "float32")


def _generate_while(honest, local_pipeline, attack, at_token: int = 5) -> list[int]:
    """Greedy tokens of the honest client's session, with ``attack(session)`` run before token ``at_token``."""
    input_ids = local_pipeline.encode_prompt(PROMPT)
    with honest.inference_session(max_length=input_ids.shape[1] + NEW_TOKENS) as session:
        tokens, step_ids = [], input_ids
        for index in range(NEW_TOKENS):
            if index == at_token:
                attack(session)
            hidden = session.step(local_pipeline.parts.embed(step_ids))
            tokens.append(int(local_pipeline.parts.logits(hidden[:, -1:])[0, -1].argmax()))
            step_ids = torch.tensor([[tokens[-1]]])
        assert session.failovers == 0
    return tokens


def _expected(local_pipeline) -> list[int]:
    return local_pipeline.generate(local_pipeline.encode_prompt(PROMPT), GREEDY).token_ids


def _assert_unharmed(honest, local_pipeline):
    input_ids = local_pipeline.encode_prompt(PROMPT)
    assert honest.generate(input_ids, GREEDY).token_ids == _expected(local_pipeline)
    assert not honest.view.banned


def test_a_record_forged_in_an_honest_servers_name_is_ignored(swarm, honest, attacker, local_pipeline):
    victim = _peer(honest, Span(10, 20))
    genuine = honest.view.servers[victim]
    forged = ServerInfo(victim, MODEL, Span(0, 30), ServerState.ONLINE, 1e-6, 10**6, 16, attacker.client_key, "x",
                        get_dht_time() + 5)
    for block in range(30):
        store_signed(attacker.dht, attacker.validator, block_key(MODEL, block), forged.to_wire(), 120,
                     victim.encode()).result(timeout=30)
    assert len(honest.dht.get(block_key(MODEL, 10), latest=True).value) == 2  # the forgery is in the DHT ...
    honest.view.refresh()
    assert honest.view.servers[victim].span == genuine.span == Span(10, 20)  # ... and read past
    _assert_unharmed(honest, local_pipeline)


def test_an_announced_throughput_attracts_no_traffic_by_itself(swarm, honest, local_pipeline):
    liar, truthful = _peer(honest, Span(0, 10), liar=True), _peer(honest, Span(0, 10))
    assert honest.view.servers[liar].throughput == LIAR_THROUGHPUT  # the claim reaches the client ...
    cost = per_block_seconds(list(honest.view.servers.values()))
    assert cost[liar] >= min(cost[truthful], cost[_peer(honest, Span(10, 20))])  # ... as no more than a typical server's
    _assert_unharmed(honest, local_pipeline)


def test_a_stranger_cannot_close_or_rewrite_an_honest_session(swarm, honest, attacker, local_pipeline):
    refusals = []

    def attack(session):
        for hop in session.hops:  # what an upstream server of the chain learns from next_hops
            stub = attacker.stub(hop.peer_id)
            for call in (stub.close_session(hop.session_id),
                         stub.step(StepRequest(hop.session_id, hop.span, 0), _hidden(), timeout=10)):
                with pytest.raises(HopFailure) as failure:
                    attacker.run(call)
                refusals.append(str(failure.value))
            pushed = StepRequest(hop.session_id, hop.span, 0, "float32", (), Delivery(attacker.peer_id, "x"))
            attacker.run(stub.push_step(pushed, _hidden(), lambda reason: None, 10))  # one way: silently refused

    assert _generate_while(honest, local_pipeline, attack) == _expected(local_pipeline)
    assert len(refusals) == 6 and all("belongs to another peer" in refusal for refusal in refusals), refusals
    assert not honest.view.banned


def test_one_peer_cannot_take_a_servers_whole_cache(swarm, honest, attacker, local_pipeline):
    target = _peer(honest, Span(10, 20))
    stub, opened = attacker.stub(target), []

    def open_session(max_length: int, batch: int = 1) -> str:
        session_id = uuid.uuid4().hex
        attacker.run(stub.open_session(OpenSessionRequest(session_id, Span(10, 20), max_length, None, batch)))
        opened.append(session_id)
        return session_id

    try:
        with pytest.raises(HopFailure, match="batch 4096 exceeds"):
            open_session(8, batch=4096)
        wide = open_session(4, batch=16)
        with pytest.raises(HopFailure, match="4096 rows × 1 tokens exceeds"):  # refused before it runs
            attacker.run(stub.step(StepRequest(wide, Span(10, 20), 0), _hidden(rows=4096), timeout=30))
        with pytest.raises(HopFailure, match="sessions here|share"):
            for _ in range(20):
                open_session(2048)
        assert len(opened) <= 9  # half of the server's 16 sessions, or half of its cache budget
        _assert_unharmed(honest, local_pipeline)
    finally:
        for session_id in opened:
            attacker.run(stub.close_session(session_id))


def test_a_big_prefill_returns_its_memory_when_the_session_closes(swarm, honest, attacker):
    target = _peer(honest, Span(20, 30))
    process = psutil.Process(next(server.process.pid for server in swarm.servers if peer_id_of(server) == target))
    stub, session_id = attacker.stub(target), uuid.uuid4().hex
    before = process.memory_info().rss
    attacker.run(stub.open_session(OpenSessionRequest(session_id, Span(20, 30), 512, None, 4)))
    attacker.run(stub.step(StepRequest(session_id, Span(20, 30), 0), _hidden(rows=4, tokens=512), timeout=120))
    during = process.memory_info().rss
    attacker.run(stub.close_session(session_id))
    time.sleep(1.0)
    after = process.memory_info().rss
    reserved = 4 * 512 * 2 * 3 * 64 * 4 * 10  # batch × max_length × (keys and values × kv heads × head dim × 4 bytes) × blocks
    assert during - before >= reserved // 2, (before, during)  # the cache was really held ...
    assert after - before < 64 * 2**20, (before, during, after)  # ... and given back


def test_a_chain_that_comes_back_to_a_server_is_refused(swarm, honest, attacker):
    first, second = _peer(honest, Span(0, 10)), _peer(honest, Span(10, 20))
    ids = [uuid.uuid4().hex for _ in range(3)]
    for peer, span, session_id in ((first, Span(0, 10), ids[0]), (second, Span(10, 20), ids[1]), (first, Span(0, 10), ids[2])):
        attacker.run(attacker.stub(peer).open_session(OpenSessionRequest(session_id, span, 8)))
    try:
        loop = StepRequest(ids[0], Span(0, 10), 0, "float32", (Hop(second, Span(10, 20), ids[1]), Hop(first, Span(0, 10), ids[2])))
        with pytest.raises(HopFailure, match="a loop"):
            attacker.run(attacker.stub(first).step(loop, _hidden(), timeout=10))
        twice = StepRequest(ids[0], Span(0, 10), 0, "float32", (Hop(second, Span(10, 20), ids[1]),)).to_wire()
        twice["next_hops"] *= 2
        request = runtime_pb2.ExpertRequest(tensors=_hidden(), metadata=codec.pack_metadata(twice))
        reply = codec.read_message(Reply, attacker.run(attacker.stub(first).stub.rpc_step(request)))
        assert not reply.ok and "more than once" in reply.error
    finally:
        for peer, session_id in ((first, ids[0]), (second, ids[1]), (first, ids[2])):
            attacker.run(attacker.stub(peer).close_session(session_id))


def test_evidence_dated_in_the_future_is_dropped(swarm, honest, attacker):
    future = SpotCheckEvidence((_peer(honest, Span(0, 10)),), 4, 0.1, 0.9, 1e12, attacker.client_key)
    store_signed(attacker.dht, attacker.validator, evidence_key(MODEL), future.to_wire(), 600).result(timeout=30)
    found = honest.dht.get(evidence_key(MODEL), latest=True)
    assert found is not None and len(found.value) >= 1  # the verifier would read it ...
    assert evidence_in(found) == []  # ... and drop it, so its per-reporter marks never move


def test_a_verifier_keeps_its_key_and_peer_id_across_a_restart(swarm, tmp_path):
    config = VerifierNodeConfig(model=MODEL, initial_peers=tuple(swarm.initial_peers), rounds=1,
                                identity_path=tmp_path / "verifier.key",
                                decisions=VerifierConfig(ledger_path=tmp_path / "ledger.sqlite"))
    identities, threads = [], torch.get_num_threads()
    for _ in range(2):
        verifier = Verifier(config)
        try:
            verifier.start()
            identities.append((verifier.key, verifier.p2p.peer_id.to_base58()))
        finally:
            verifier.shutdown()
    assert identities[0] == identities[1]
    # torch's thread count is process-wide: an in-process verifier must leave its host's alone (a test after this
    # one SVD-compresses locally and must round as its server processes do)
    assert torch.get_num_threads() == threads
