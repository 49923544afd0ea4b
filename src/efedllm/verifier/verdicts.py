"""Trust verdicts in the hivemind DHT: published signed by a verifier, read back and validated strictly.

A verdict on server ``P`` lives under key ``{model}.verdict.{P}`` with subkey equal to the
verifier's ``RSASignatureValidator().local_public_key`` (``b"[owner:<public key>]"``). Because the
subkey embeds the key, hivemind signs the record and every node rejects a record for that subkey
that the same key did not sign: nobody can forge or overwrite another verifier's verdict. A
verifier is named by ``verifier_key(validator)``, the hex of that subkey; a verdict whose
``verifier_key`` differs from the subkey it is stored under is dropped (a signed record of key A
cannot speak for key B).

Who obeys which verdict is decided by :func:`efedllm.verifier.quorum.deactivated_peers`.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Iterable

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from efedllm.discovery import get_latest_many
from efedllm.records import RecordError, TrustVerdict
from efedllm.verifier.quorum import QuorumRule, deactivated_peers

logger = logging.getLogger(__name__)
DEFAULT_VERDICT_MAX_AGE_S = 600.0
_OWNER_SUBKEY = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX, re.DOTALL)


def verdict_key(model: str, server_peer_id: str) -> str:
    return f"{model}.verdict.{server_peer_id}"


def verifier_key(validator: RSASignatureValidator) -> str:
    """How a verifier is named in verdicts and in ``--trusted-verifiers``: hex of its signed subkey."""
    return validator.local_public_key.hex()


def publish_verdict(dht: DHT, validator: RSASignatureValidator, model: str, verdict: TrustVerdict,
                    ttl: float, timeout: float = 30.0) -> bool:
    """Store ``verdict`` signed by ``validator``'s key; True when at least one peer accepted it."""
    if verdict.verifier_key != verifier_key(validator):
        raise ValueError("a verifier can only publish verdicts under its own key")
    future = dht.store(verdict_key(model, verdict.server_peer_id), verdict.to_wire(), get_dht_time() + ttl,
                       subkey=validator.local_public_key, return_future=True)
    return bool(future.result(timeout=timeout))


def parse_verdict_entry(server_peer_id: str, subkey, value) -> TrustVerdict:
    """One DHT entry -> a verdict; RecordError when it is unsigned, malformed or speaks for another key."""
    if not isinstance(subkey, bytes) or not _OWNER_SUBKEY.fullmatch(subkey):
        raise RecordError("verdict subkey is not exactly one signed owner key")
    verdict = TrustVerdict.from_wire(value)
    if verdict.verifier_key != subkey.hex():
        raise RecordError("verdict names a verifier key other than the key that signed it")
    if verdict.server_peer_id != server_peer_id:
        raise RecordError(f"verdict on {verdict.server_peer_id} is stored under server {server_peer_id}")
    return verdict


def fetch_verdicts(dht: DHT, model: str, peer_ids: Iterable[str], timeout: float = 10.0) -> list[TrustVerdict]:
    """Every valid verdict on the servers ``peer_ids``, from any verifier; malformed ones are dropped."""
    peer_ids = sorted(set(peer_ids))
    found_by_key = get_latest_many(dht, [verdict_key(model, peer) for peer in peer_ids], timeout)
    verdicts: list[TrustVerdict] = []
    for peer in peer_ids:
        found = found_by_key.get(verdict_key(model, peer))
        if found is None or not isinstance(found.value, dict):
            continue
        for subkey, entry in found.value.items():
            try:
                verdicts.append(parse_verdict_entry(peer, subkey, entry.value))
            except (RecordError, TypeError, ValueError) as error:
                logger.warning("ignoring malformed verdict on %s: %s", peer, error)
    return verdicts


def deactivated_peers_in_dht(
    dht: DHT,
    model: str,
    peer_ids: Iterable[str],
    trusted_keys: Iterable[str],
    quorum: QuorumRule = QuorumRule("majority"),
    max_age_s: float = DEFAULT_VERDICT_MAX_AGE_S,
    now: float | None = None,
) -> set[str]:
    """Servers among ``peer_ids`` that a quorum of ``trusted_keys`` currently judge inactive (none without keys)."""
    trusted = frozenset(trusted_keys)
    if not trusted:
        return set()
    verdicts = fetch_verdicts(dht, model, peer_ids)
    return set(deactivated_peers(verdicts, trusted, quorum, time.time() if now is None else now, max_age_s))
