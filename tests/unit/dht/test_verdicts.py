"""Parsing verdict entries read from the DHT (offline; the signed round trip is in tests/swarm/test_verifier.py)."""

from __future__ import annotations

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from efedllm.common.errors import RecordError
from efedllm.dht.records import TrustVerdict
from efedllm.dht.signed import SignedEntry, owner_key
from efedllm.dht.verdicts import parse_verdict_entry, verdict_key

VALIDATOR = RSASignatureValidator(RSAPrivateKey())
OTHER = RSASignatureValidator(RSAPrivateKey())


def verdict(**changes) -> TrustVerdict:
    fields = dict(server_peer_id="peerA", score=0.5, active=False, probes=4, passed=1, timestamp=1000.0,
                  verifier_key=owner_key(VALIDATOR), policy="robust")
    return TrustVerdict(**{**fields, **changes})


def test_valid_entry_round_trips():
    assert parse_verdict_entry("peerA", SignedEntry.read(VALIDATOR.local_public_key, verdict().to_wire())) == verdict()
    assert verdict_key("m", "peerA") == "m.verdict.peerA"


@pytest.mark.parametrize("subkey, value, message", [
    (b"plain", verdict().to_wire(), "no signed owner key"),
    (b"x" + VALIDATOR.local_public_key, verdict().to_wire(), "signed owner key"),
    (OTHER.local_public_key, verdict().to_wire(), "other than the key that signed"),
    (VALIDATOR.local_public_key, verdict(server_peer_id="peerB").to_wire(), "stored under server"),
    (VALIDATOR.local_public_key, {**verdict().to_wire(), "version": 9}, "version"),
    (VALIDATOR.local_public_key, {**verdict().to_wire(), "extra": 1}, "unknown field"),
    (VALIDATOR.local_public_key, "not a mapping", "mapping"),
])
def test_malformed_entries_are_rejected(subkey, value, message):
    with pytest.raises(RecordError, match=message):
        parse_verdict_entry("peerA", SignedEntry.read(subkey, value))
