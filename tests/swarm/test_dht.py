"""Signed records on real hivemind DHT peers (127.0.0.1): server records, verdicts, evidence, and forgeries."""

from __future__ import annotations

import time

import pytest
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from efedllm.common.spans import Span
from efedllm.dht.evidence import fetch_evidence, publish_evidence
from efedllm.dht.identity import Identity, start_dht
from efedllm.dht.records import ServerInfo, ServerState, SpotCheckEvidence, TrustVerdict
from efedllm.dht.servers import announce, block_key, fetch_servers
from efedllm.dht.signed import owner_key, store_signed
from efedllm.dht.verdicts import deactivated_peers_in_dht, fetch_verdicts, publish_verdict

pytestmark = pytest.mark.swarm
MODEL = "dht-test-model"


def _node(identity: Identity, initial_peers=None) -> DHT:
    return start_dht(identity, initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"])


@pytest.fixture(scope="module")
def peers():
    """(bootstrap node, server node and its validator, an attacker node and its validator, a reader node)."""
    nodes = []
    try:
        bootstrap = _node(Identity.generate())
        nodes.append(bootstrap)
        initial = [str(maddr) for maddr in bootstrap.get_visible_maddrs()]
        server_identity, attacker_identity = Identity.generate(), Identity.generate()
        server, attacker = _node(server_identity, initial), _node(attacker_identity, initial)
        reader = _node(Identity.generate(), initial)
        nodes += [server, attacker, reader]
        yield bootstrap, (server, server_identity.validator), (attacker, attacker_identity.validator), reader
    finally:
        for node in nodes:
            node.shutdown()


def _info(dht: DHT, validator, state=ServerState.ONLINE, span=Span(0, 3), peer_id: str | None = None) -> ServerInfo:
    return ServerInfo(peer_id or dht.peer_id.to_base58(), MODEL, span, state, 10.0, 100, 4, owner_key(validator), "test",
                      get_dht_time())


def _eventually(read, expected, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_an_announced_record_is_read_back_and_the_newest_one_wins(peers):
    _, (server, key), _, reader = peers
    joining = _info(server, key, ServerState.JOINING)
    assert announce(server, key, joining, ttl=60) == 0
    assert _eventually(lambda: fetch_servers(reader, MODEL, 10), {joining.peer_id: joining}) == {joining.peer_id: joining}
    moved = _info(server, key, span=Span(2, 5))  # blocks 3 and 4 hold only the new record, 0 and 1 only the old one
    assert announce(server, key, moved, ttl=120) == 0
    assert _eventually(lambda: fetch_servers(reader, MODEL, 10), {moved.peer_id: moved}) == {moved.peer_id: moved}


def test_records_that_speak_for_another_key_or_peer_are_dropped(peers):
    _, (server, key), (attacker, attacker_key), reader = peers
    honest = _info(server, key, span=Span(5, 7))
    victim = honest.peer_id
    announce(server, key, honest, ttl=120)
    # the attacker cannot store under the server's subkey (the DHT refuses an unsigned change) ...
    forged = _info(server, key, span=Span(5, 7), state=ServerState.OFFLINE)
    attacker.store(block_key(MODEL, 5), forged.to_wire(), time.time() + 600, subkey=victim.encode() + key.local_public_key,
                   return_future=True).result(timeout=30)
    # ... and what it stores under its own key but in the victim's name is dropped on read
    in_victims_name = _info(server, key, span=Span(5, 7), state=ServerState.OFFLINE)  # names the victim's key
    store_signed(attacker, attacker_key, block_key(MODEL, 5), in_victims_name.to_wire(), 600, victim.encode()).result(30)
    other_peer = _info(server, attacker_key, span=Span(5, 7), peer_id=attacker.peer_id.to_base58())
    store_signed(attacker, attacker_key, block_key(MODEL, 6), other_peer.to_wire(), 600, victim.encode()).result(30)
    for block in (5, 6):  # the reader sees the honest record and a forgery, which expires later, under each key ...
        assert _eventually(lambda: len(reader.get(block_key(MODEL, block), latest=True).value), 2) == 2
    servers = fetch_servers(reader, MODEL, 10)
    assert servers[victim] == honest and attacker.peer_id.to_base58() not in servers  # ... and keeps only the first


def test_a_record_in_another_peers_name_signed_by_the_forgers_own_key_is_dropped(peers):
    """Issue 15's forgery: the record names the victim's id under the victim's id prefix, and names and is
    signed by the forger's own key, so every check but the peer id's binding to the key passes."""
    _, (server, key), (attacker, attacker_key), reader = peers
    honest = _info(server, key, span=Span(8, 10))
    announce(server, key, honest, ttl=120)
    forged = _info(server, attacker_key, span=Span(0, 10), peer_id=honest.peer_id)
    forged = ServerInfo(**{**forged.__dict__, "throughput": 1e-6, "issued_at": get_dht_time() + 5})
    store_signed(attacker, attacker_key, block_key(MODEL, 8), forged.to_wire(), 600, honest.peer_id.encode()).result(30)
    assert _eventually(lambda: len(reader.get(block_key(MODEL, 8), latest=True).value), 2) == 2
    assert fetch_servers(reader, MODEL, 10)[honest.peer_id] == honest



def test_verdicts_and_evidence_round_trip_and_a_quorum_counts_trusted_keys_only(peers):
    _, (server, key), (attacker, attacker_key), reader = peers
    target = "QmTargetServer"
    now = time.time()
    verdict = TrustVerdict(target, 0.0, False, 4, 0, now, owner_key(key), "robust")
    assert publish_verdict(server, key, MODEL, verdict, ttl=60)
    assert _eventually(lambda: fetch_verdicts(reader, MODEL, [target]), [verdict]) == [verdict]
    assert deactivated_peers_in_dht(reader, MODEL, [target], {owner_key(key)}) == {target}
    assert deactivated_peers_in_dht(reader, MODEL, [target], {owner_key(key), owner_key(attacker_key)}, "all") == set()
    assert deactivated_peers_in_dht(reader, MODEL, [target], ()) == set()
    with pytest.raises(ValueError, match="its own key"):
        publish_verdict(attacker, attacker_key, MODEL, verdict, ttl=60)
    evidence = SpotCheckEvidence((target,), 4, 0.1, 0.9, now, owner_key(attacker_key))
    assert publish_evidence(attacker, attacker_key, MODEL, evidence)
    assert _eventually(lambda: fetch_evidence(reader, MODEL), [evidence]) == [evidence]
    assert fetch_evidence(reader, MODEL, since=now + 1) == []
