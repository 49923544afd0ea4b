"""Which servers are deactivated, as clients and servers see it: trusted verifiers' verdicts and a quorum.

Clients and servers obey only verdicts from the verifier public keys they were configured with.
Each trusted verifier casts at most one vote per server: its newest verdict that is fresh
(``now - max_age_s <= timestamp <= now + max_clock_skew_s``). A server is deactivated when at
least the quorum's number of trusted verifiers vote "inactive".

The quorum is counted against the **configured** trusted keys, not against those that happened to
report: with ``majority`` and three trusted verifiers, two must agree, so one verifier (or a
stolen key) cannot deactivate honest servers alone, and verifiers that go silent can only make
the swarm more permissive, never less.

Precondition: ``verdict.verifier_key`` has been checked against the key that signed the record
(the DHT's signature validator does this); this module decides, it does not verify signatures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import AbstractSet, Iterable

from efedllm.dht.records import TrustVerdict

QUORUM_WORDS = ("any", "majority", "all")


@dataclass(frozen=True)
class QuorumRule:
    """``any`` (one vote), ``majority`` (more than half), ``all``, or a fixed number of votes."""

    rule: str | int = "majority"

    def __post_init__(self) -> None:
        if isinstance(self.rule, bool) or not isinstance(self.rule, (str, int)):
            raise ValueError(f"quorum must be one of {QUORUM_WORDS} or a positive integer, got {self.rule!r}")
        if isinstance(self.rule, str) and self.rule not in QUORUM_WORDS:
            raise ValueError(f"quorum must be one of {QUORUM_WORDS} or a positive integer, got {self.rule!r}")
        if isinstance(self.rule, int) and self.rule < 1:
            raise ValueError(f"a numeric quorum must be >= 1, got {self.rule}")

    @classmethod
    def parse(cls, text: str) -> "QuorumRule":
        """The CLI form: ``any``, ``majority``, ``all`` or a number such as ``2``."""
        text = text.strip()
        return cls(int(text)) if text.isdigit() else cls(text)

    def required_votes(self, trusted_count: int) -> int:
        """How many trusted verifiers must vote "inactive" out of ``trusted_count`` configured."""
        if trusted_count < 1:
            raise ValueError("no trusted verifier keys are configured")
        if self.rule == "any":
            return 1
        if self.rule == "majority":
            return trusted_count // 2 + 1
        if self.rule == "all":
            return trusted_count
        if self.rule > trusted_count:
            raise ValueError(f"quorum {self.rule} exceeds the {trusted_count} trusted verifier keys")
        return self.rule


def check_trusted_verifiers(keys, quorum: str) -> tuple[str, ...]:
    """``keys`` as a tuple, checked with ``quorum`` (the CLI form) as a client or server configures them.

    Raises ValueError for an empty key or a quorum the keys cannot reach (e.g. 3 of 2 keys)."""
    keys = tuple(keys)
    if not all(isinstance(key, str) and key for key in keys):
        raise ValueError("trusted_verifier_keys must be non-empty hex strings")
    rule = QuorumRule.parse(quorum)
    if keys:
        rule.required_votes(len(keys))
    return keys


def latest_fresh_votes(
    verdicts: Iterable[TrustVerdict],
    trusted_keys: AbstractSet[str],
    now: float,
    max_age_s: float,
    max_clock_skew_s: float = 60.0,
) -> dict[tuple[str, str], TrustVerdict]:
    """``(server, verifier key) -> newest fresh verdict`` from trusted verifiers only."""
    if not (math.isfinite(max_age_s) and max_age_s > 0 and max_clock_skew_s >= 0):
        raise ValueError(f"need max_age_s > 0 and max_clock_skew_s >= 0, got {max_age_s}, {max_clock_skew_s}")
    votes: dict[tuple[str, str], TrustVerdict] = {}
    for verdict in verdicts:
        if verdict.verifier_key not in trusted_keys:
            continue
        if not now - max_age_s <= verdict.timestamp <= now + max_clock_skew_s:
            continue
        key = (verdict.server_peer_id, verdict.verifier_key)
        if key not in votes or verdict.timestamp > votes[key].timestamp:
            votes[key] = verdict
    return votes


def deactivated_peers(
    verdicts: Iterable[TrustVerdict],
    trusted_keys: AbstractSet[str],
    quorum: QuorumRule,
    now: float,
    max_age_s: float,
    max_clock_skew_s: float = 60.0,
) -> frozenset[str]:
    """Peer ids that at least ``quorum`` trusted verifiers currently judge inactive."""
    required = quorum.required_votes(len(trusted_keys))
    inactive_votes: dict[str, int] = {}
    for (server, _key), verdict in latest_fresh_votes(verdicts, trusted_keys, now, max_age_s, max_clock_skew_s).items():
        if not verdict.active:
            inactive_votes[server] = inactive_votes.get(server, 0) + 1
    return frozenset(server for server, count in inactive_votes.items() if count >= required)
