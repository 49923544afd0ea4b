"""Trust verdicts in the hivemind DHT: published signed by a verifier, read back and validated strictly.

A verdict on server ``P`` lives under key ``{model}.verdict.{P}``, subkey exactly the verifier's
owner key (:mod:`efedllm.dht.signed`): nobody can forge or overwrite another verifier's verdict. A
verifier is named by :func:`~efedllm.dht.signed.owner_key`; a verdict whose ``verifier_key`` differs
from the key that signed it is dropped (a signed record of key A cannot speak for key B).

Who obeys which verdict is decided by :func:`efedllm.dht.quorum.deactivated_peers`; clients and
servers ask :func:`deactivated_peers_in_dht`.
"""

from __future__ import annotations

import time
from typing import Iterable

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator

from efedllm.common.errors import RecordError
from efedllm.dht.quorum import QuorumRule, deactivated_peers
from efedllm.dht.records import TrustVerdict
from efedllm.dht.signed import SignedEntry, check_dated, get_latest_many, owner_key, read_signed, store_signed

DEFAULT_VERDICT_MAX_AGE_S = 600.0


def verdict_key(model: str, server_peer_id: str) -> str:
    return f"{model}.verdict.{server_peer_id}"


def publish_verdict(dht: DHT, validator: RSASignatureValidator, model: str, verdict: TrustVerdict,
                    ttl: float, timeout: float = 30.0) -> bool:
    """Store ``verdict`` signed by ``validator``'s key; True when at least one peer accepted it."""
    if verdict.verifier_key != owner_key(validator):
        raise ValueError("a verifier can only publish verdicts under its own key")
    future = store_signed(dht, validator, verdict_key(model, verdict.server_peer_id), verdict.to_wire(), ttl)
    return bool(future.result(timeout=timeout))


def parse_verdict_entry(server_peer_id: str, entry: SignedEntry) -> TrustVerdict:
    """One DHT entry -> a verdict; RecordError when it is malformed or speaks for another key or server."""
    if entry.prefix:
        raise RecordError("verdict subkey is not exactly one signed owner key")
    verdict = TrustVerdict.from_wire(entry.value)
    if verdict.verifier_key != entry.signer:
        raise RecordError("verdict names a verifier key other than the key that signed it")
    if verdict.server_peer_id != server_peer_id:
        raise RecordError(f"verdict on {verdict.server_peer_id} is stored under server {server_peer_id}")
    check_dated(verdict.timestamp, f"verdict on {server_peer_id}")
    return verdict


def fetch_verdicts(dht: DHT, model: str, peer_ids: Iterable[str], timeout: float = 10.0) -> list[TrustVerdict]:
    """Every valid verdict on the servers ``peer_ids``, from any verifier; malformed ones are dropped."""
    peer_ids = sorted(set(peer_ids))
    found_by_key = get_latest_many(dht, [verdict_key(model, peer) for peer in peer_ids], timeout)
    return [verdict for peer in peer_ids
            for verdict in read_signed(found_by_key.get(verdict_key(model, peer)),
                                       lambda entry, peer=peer: parse_verdict_entry(peer, entry), f"verdict on {peer}")]


def deactivated_peers_in_dht(
    dht: DHT,
    model: str,
    peer_ids: Iterable[str],
    trusted_keys: Iterable[str],
    quorum: QuorumRule | str = "majority",
    max_age_s: float = DEFAULT_VERDICT_MAX_AGE_S,
    now: float | None = None,
) -> set[str]:
    """Servers among ``peer_ids`` that a quorum of ``trusted_keys`` currently judge inactive (none without keys)."""
    trusted = frozenset(trusted_keys)
    peer_ids = list(peer_ids)
    if not trusted or not peer_ids:
        return set()
    rule = quorum if isinstance(quorum, QuorumRule) else QuorumRule.parse(quorum)
    verdicts = fetch_verdicts(dht, model, peer_ids)
    return set(deactivated_peers(verdicts, trusted, rule, time.time() if now is None else now, max_age_s))
