"""Identities: key files that survive restarts, peer ids derived from signing keys, and fresh evidence per reporter."""

from __future__ import annotations

import pytest
from hivemind.p2p import PeerID

from efedllm.dht.evidence import fresh_evidence
from efedllm.dht.identity import Identity, IdentityError, peer_id_of_owner
from efedllm.dht.records import SpotCheckEvidence


def test_an_identity_file_keeps_the_peer_id_and_key_across_restarts(tmp_path):
    path = tmp_path / "verifier.key"
    first = Identity.load_or_create(path)
    again = Identity.load_or_create(path)
    assert (again.peer_id, again.owner_key) == (first.peer_id, first.owner_key)
    assert PeerID.from_identity(path.read_bytes()).to_base58() == first.peer_id  # what p2pd derives from the file
    assert peer_id_of_owner(first.owner_key) == first.peer_id
    assert path.stat().st_mode & 0o777 == 0o400


def test_a_bad_identity_file_is_named(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not a key")
    with pytest.raises(IdentityError, match="bad.key"):
        Identity.load_or_create(bad)
    with pytest.raises(IdentityError, match="cannot create"):
        Identity.load_or_create(tmp_path / "missing-folder" / "x.key")


def test_evidence_marks_are_kept_per_reporter():
    def report(key, timestamp):
        return SpotCheckEvidence(("s",), 3, 0.5, 0.2, timestamp, key)

    seen: dict[str, float] = {}
    assert fresh_evidence([report("liar", 2000.0), report("honest", 100.0)], seen) == [report("liar", 2000.0),
                                                                                        report("honest", 100.0)]
    assert fresh_evidence([report("liar", 2000.0), report("honest", 150.0)], seen) == [report("honest", 150.0)]
