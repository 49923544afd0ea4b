"""DHT records and how readers check them, offline: server records, signed entries, the newest record per peer."""

from __future__ import annotations

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from efedllm.common.errors import RecordError
from efedllm.common.spans import Span
from efedllm.dht.identity import Identity, peer_id_of_owner
from efedllm.dht.records import ServerInfo, ServerState, SpotCheckEvidence
from efedllm.dht.servers import newest_by_peer, parse_server_entry
from efedllm.dht.signed import MAX_CLOCK_SKEW_S, SignedEntry, owner_key, split_subkey

IDENTITY, STRANGER = Identity.generate(), Identity.generate()
VALIDATOR = IDENTITY.validator
OTHER = RSASignatureValidator(RSAPrivateKey())
PEER_A = IDENTITY.peer_id
NOW = 1.0e9


def info(peer: str = PEER_A, key: str | None = None, **changes) -> ServerInfo:
    fields = dict(peer_id=peer, model="m", span=Span(0, 10), state=ServerState.ONLINE, throughput=12.5,
                  free_cache_tokens=100, max_sessions=4, public_key=key or owner_key(VALIDATOR), software_version="0.1.0",
                  issued_at=NOW)
    return ServerInfo(**{**fields, **changes})


def test_server_record_round_trip_and_strictness():
    record = info()
    assert ServerInfo.from_wire(record.to_wire()) == record
    for change, message in [({"version": 1}, "version 1, this peer reads version 3"), ({"state": "weird"}, "state"),
                            ({"throughput": float("nan")}, "finite"), ({"extra": 1}, "unknown field"),
                            ({"wire_formats": "float32"}, "must be a list")]:
        with pytest.raises(RecordError, match=message):
            ServerInfo.from_wire({**record.to_wire(), **change})
    with pytest.raises(RecordError, match="lacks"):
        ServerInfo.from_wire({k: v for k, v in record.to_wire().items() if k != "span"})


def test_subkeys_must_end_in_exactly_one_owner_key():
    assert split_subkey(b"peerA" + VALIDATOR.local_public_key) == (b"peerA", owner_key(VALIDATOR))
    assert split_subkey(VALIDATOR.local_public_key) == (b"", owner_key(VALIDATOR))
    for bad in (b"peerA", "peerA" + VALIDATOR.local_public_key.decode(), VALIDATOR.local_public_key + b"tail",
                VALIDATOR.local_public_key + OTHER.local_public_key, None):
        with pytest.raises(RecordError):
            split_subkey(bad)


def entry_for(record: ServerInfo, validator=VALIDATOR, prefix: str | None = None) -> SignedEntry:
    return SignedEntry.read((prefix or record.peer_id).encode() + validator.local_public_key, record.to_wire(), 100.0)


def test_a_server_record_must_be_stored_under_its_own_peer_id_and_key():
    assert parse_server_entry(entry_for(info()), now=NOW) == info()
    with pytest.raises(RecordError, match="another peer's subkey"):
        parse_server_entry(entry_for(info(), prefix="peerB"), now=NOW)
    with pytest.raises(RecordError, match="key other than the one that signed it"):  # signed by OTHER, names VALIDATOR
        parse_server_entry(entry_for(info(), OTHER), now=NOW)


def test_a_server_record_is_accepted_only_when_signed_by_its_peers_identity_key():
    # the forgery of issue 15: a record naming peer A's id, stored under A's id, signed and named by the forger's key
    forged = info(public_key=STRANGER.owner_key)
    with pytest.raises(RecordError, match="signed by another peer's key"):
        parse_server_entry(entry_for(forged, STRANGER.validator), now=NOW)
    assert peer_id_of_owner(STRANGER.owner_key) == STRANGER.peer_id != PEER_A
    with pytest.raises(RecordError, match="not an RSA public key"):
        peer_id_of_owner(b"[owner:garbage]".hex())


def test_a_server_record_from_the_future_is_refused():
    assert parse_server_entry(entry_for(info(issued_at=NOW + MAX_CLOCK_SKEW_S - 1)), now=NOW)
    with pytest.raises(RecordError, match="in the future"):
        parse_server_entry(entry_for(info(issued_at=NOW + MAX_CLOCK_SKEW_S + 1)), now=NOW)


def test_of_several_records_for_one_peer_the_newest_is_kept_whatever_the_order():
    old, new = info(state=ServerState.JOINING, issued_at=NOW - 10), info(span=Span(20, 30))
    other = info("peerB", span=Span(10, 20), issued_at=NOW - 20)
    for records in ([old, new, other], [new, old, other]):
        assert newest_by_peer(records) == {PEER_A: new, "peerB": other}


def test_evidence_needs_suspects_and_numbers():
    evidence = SpotCheckEvidence(("a", "b"), 3, 0.5, 0.2, 1000.0, owner_key(VALIDATOR))
    assert SpotCheckEvidence.from_wire(evidence.to_wire()) == evidence
    with pytest.raises(RecordError, match="suspects"):
        SpotCheckEvidence((), 3, 0.5, 0.2, 1000.0, "k")
    with pytest.raises(RecordError, match="worst_cosine must be a number"):
        SpotCheckEvidence.from_wire({**evidence.to_wire(), "worst_cosine": "nan"})
