"""Spot-check evidence in the DHT: clients report mismatching chains, verifiers probe the suspects first.

One record per reporting client under key ``{model}.evidence``, subkey exactly the client's owner
key (:mod:`efedllm.dht.signed`): a client can only write its own report, and a record whose
``reporter_key`` differs from the key that signed it is dropped. Evidence only *prioritises*
probes: a client's word never deactivates anyone (a lying client could otherwise deactivate honest
servers); the verifier's own probes decide. Evidence dated beyond the clock skew is dropped, and a
reader keeps a "seen up to" mark per reporter (:func:`fresh_evidence`), so one reporter's dates
cannot hide another's reports.
"""

from __future__ import annotations

import logging

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator

from efedllm.common.errors import RecordError
from efedllm.dht.records import SpotCheckEvidence
from efedllm.dht.signed import SignedEntry, check_dated, owner_key, read_signed, store_signed

logger = logging.getLogger(__name__)
EVIDENCE_TTL_S = 600.0


def evidence_key(model: str) -> str:
    return f"{model}.evidence"


def publish_evidence(dht: DHT, validator: RSASignatureValidator, model: str, evidence: SpotCheckEvidence,
                     ttl: float = EVIDENCE_TTL_S, timeout: float = 30.0) -> bool:
    """Store ``evidence`` signed by ``validator``'s key (replacing this reporter's previous one)."""
    if evidence.reporter_key != owner_key(validator):
        raise ValueError("a client can only publish evidence under its own key")
    return bool(store_signed(dht, validator, evidence_key(model), evidence.to_wire(), ttl).result(timeout=timeout))


def parse_evidence_entry(entry: SignedEntry) -> SpotCheckEvidence:
    if entry.prefix:
        raise RecordError("evidence subkey is not exactly one signed owner key")
    evidence = SpotCheckEvidence.from_wire(entry.value)
    if evidence.reporter_key != entry.signer:
        raise RecordError("evidence names a reporter key other than the key that signed it")
    check_dated(evidence.timestamp, "spot-check evidence")
    return evidence


def fetch_evidence(dht: DHT, model: str, since: float = 0.0, timeout: float = 10.0) -> list[SpotCheckEvidence]:
    """Valid evidence newer than ``since`` (unix time); malformed or forged entries are dropped."""
    try:
        found = dht.get(evidence_key(model), latest=True, return_future=True).result(timeout=timeout)
    except Exception as error:
        logger.debug("evidence lookup failed: %s", error)
        return []
    return evidence_in(found, since)


def evidence_in(found, since: float = 0.0) -> list[SpotCheckEvidence]:
    """The valid evidence newer than ``since`` in a DHT lookup result (``dht.get``'s value or None)."""
    return [report for report in read_signed(found, parse_evidence_entry, "evidence") if report.timestamp > since]


def fresh_evidence(reports: list[SpotCheckEvidence], seen: dict[str, float]) -> list[SpotCheckEvidence]:
    """The reports newer than their reporter's mark in ``seen`` (reporter key -> newest timestamp
    acted on), which is moved forward for those reporters; pure but for ``seen``."""
    fresh = [report for report in reports if report.timestamp > seen.get(report.reporter_key, 0.0)]
    for report in fresh:
        seen[report.reporter_key] = max(seen.get(report.reporter_key, 0.0), report.timestamp)
    return fresh


def probe_order(online_peer_ids: list[str], evidence: list[SpotCheckEvidence]) -> list[str]:
    """Suspects first (each probed twice this round), then everyone else once; pure."""
    suspects = {peer for report in evidence for peer in report.suspects} & set(online_peer_ids)
    first = [peer for peer in online_peer_ids if peer in suspects]
    return first + list(online_peer_ids)
