"""Audits of real traffic (issue 15): a server that lies only after its first steps is proven a liar from a
client's audited session, deactivated at once and its credit clawed back; honest servers, a bfloat16 one
included, stay clean; a client cannot frame anyone. Own swarm: the package's has no verifier."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from efedllm.client.audit import audit_request
from efedllm.client.config import RemoteClientConfig
from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.client.routing import RouteHop
from efedllm.client.sampling import GenerationConfig
from efedllm.client.session import RemoteInferenceSession
from efedllm.common.spans import Span
from efedllm.dht.identity import peer_id_of_owner
from efedllm.dht.verdicts import deactivated_peers_in_dht
from efedllm.protocol.audit import submit_audit
from efedllm.server.swarm import LocalSwarm, peer_id_of
from efedllm.verifier.config import VerifierConfig
from efedllm.verifier.node import Verifier, VerifierNodeConfig

MODEL = "smollm2-135m"
CHEAT = "noise:0.1;after=3"  # honest on a session's first three steps (a prefill and two tokens), then noisy
GREEDY = GenerationConfig(max_new_tokens=6, greedy=True, stop_on_eos=False)


@pytest.fixture(scope="module")
def audited_swarm(tmp_path_factory):
    with LocalSwarm(MODEL) as swarm:
        swarm.start_bootstrap()
        servers = {"first": swarm.start_server("0:10", extra=["--no-rebalance"]),
                   "cheater": swarm.start_server("10:20", extra=["--no-rebalance", "--fault", CHEAT]),
                   "bf16": swarm.start_server("10:20", extra=["--no-rebalance", "--dtype", "bfloat16"]),
                   "last": swarm.start_server("20:30", extra=["--no-rebalance"])}
        swarm.wait_until_online(len(servers))
        peers = {name: peer_id_of(server) for name, server in servers.items()}
        decisions = VerifierConfig(ledger_path=tmp_path_factory.mktemp("ledger") / "ledger.sqlite")
        verifier = Verifier(VerifierNodeConfig(MODEL, tuple(swarm.initial_peers), rounds=1, decisions=decisions))
        verifier.start()
        config = RemoteClientConfig(trusted_verifier_keys=(verifier.key,), audit_fraction=1.0, server_view_max_age=0.0)
        client = DistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers, config)
        try:
            yield swarm, verifier, client, peers
        finally:
            client.shutdown()
            verifier.shutdown()


def _generate_on(client, peers, middle: str, prompt: str = "The capital of France is", tokens: int = 6):
    """Greedy tokens through first -> ``middle`` -> last, in an audited session; its audits answered."""
    route = [RouteHop(peers["first"], Span(0, 10)), RouteHop(peers[middle], Span(10, 20)),
             RouteHop(peers["last"], Span(20, 30))]
    ids = client.parts.tokenizer(prompt, return_tensors="pt")["input_ids"]
    config = dataclasses.replace(GREEDY, max_new_tokens=tokens)
    session = RemoteInferenceSession(client, ids.shape[1] + tokens, audited=True)
    client.run(session.open_route(route))
    try:
        new_ids = client._decode_loop(session, ids, config, None)[0].new_ids
    finally:
        audits_before = len(client.audits)
        client.run(session.finish())
        client.wait_for_audits()
    return new_ids, {record.server: record.verdict for record in client.audits[audits_before:]}


def test_a_server_lying_after_its_first_steps_is_proven_deactivated_and_clawed_back(audited_swarm):
    swarm, verifier, client, peers = audited_swarm
    _, verdicts = _generate_on(client, peers, "cheater", tokens=2)  # a prefill and a step: it answers honestly
    assert {verdict.verdict for verdict in verdicts.values()} == {"clean"}, verdicts
    verifier.book_audits()  # its clean work is credited...
    _, verdicts = _generate_on(client, peers, "cheater")
    assert verdicts[peers["cheater"]].verdict == "lie" and verdicts[peers["cheater"]].step == 3, verdicts
    assert verdicts[peers["first"]].verdict == verdicts[peers["last"]].verdict == "clean"
    assert set(verifier.proven_liars) == {peers["cheater"]}
    deadline = time.monotonic() + 30  # the verdict was published before the audit was answered
    while peers["cheater"] not in deactivated_peers_in_dht(client.dht, MODEL, peers.values(), [verifier.key]):
        assert time.monotonic() < deadline, "no verdict deactivating the cheater in the DHT"
        time.sleep(0.5)
    verifier.book_audits()
    clawed = verifier.ledger.clawbacks(peers["cheater"])  # ...and forfeited once the lie is proven
    assert clawed and sum(record.work for record in clawed) >= 6 * 10  # 6 tokens × 10 blocks of the clean session
    assert all(record.reason.startswith("proven lie") for record in clawed)
    assert set(verifier.ledger.deactivations()) == {peers["cheater"]}  # remembered across a restart
    assert not any(verifier.ledger.clawbacks(peers[name]) for name in ("first", "bf16", "last"))


def test_an_honest_bfloat16_server_stays_clean_and_clients_route_around_the_liar(audited_swarm):
    swarm, verifier, client, peers = audited_swarm
    for prompt in ("The capital of France is", "Water boils at a temperature of"):
        _, verdicts = _generate_on(client, peers, "bf16", prompt)
        assert {verdict.verdict for verdict in verdicts.values()} == {"clean"}, verdicts
    assert peers["bf16"] not in verifier.proven_liars
    client.view.refresh(0.0)
    ids = client.parts.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with client.inference_session(ids.shape[1] + GREEDY.max_new_tokens) as session:
        client._decode_loop(session, ids, GREEDY, None)
        assert peers["cheater"] not in {hop.peer_id for hop in session.route}  # deactivated by the verdict
    assert set(verifier.proven_liars) == {peers["cheater"]}


def test_an_audit_a_client_edited_proves_nothing_against_an_honest_server(audited_swarm):
    swarm, verifier, client, peers = audited_swarm
    route = [RouteHop(peers["first"], Span(0, 10)), RouteHop(peers["bf16"], Span(10, 20)),
             RouteHop(peers["last"], Span(20, 30))]
    session = RemoteInferenceSession(client, 16, audited=True)
    client.run(session.open_route(route))
    hidden = client.parts.embed(client.parts.tokenizer("Hello there, friend", return_tensors="pt")["input_ids"])
    session.step(hidden)
    session.step(client.parts.embed(torch.tensor([[42]])))
    trace = session.audit.traces[session.session_ids[0]]
    client.run(session.close())
    edited = dataclasses.replace(trace, steps=trace.steps[1:])  # the prefill left out: the decode looks wrong
    request, tensors = audit_request(MODEL, edited)
    client.wait_for_audits()  # the verifier judges one audit per peer at a time: the earlier tests' must be done
    verdict = client.run(submit_audit(client.p2p, peer_id_of_owner(verifier.key), request, tensors))
    assert verdict.verdict == "invalid" and "left out or reordered" in verdict.reason, verdict
    assert peers["first"] not in verifier.proven_liars
