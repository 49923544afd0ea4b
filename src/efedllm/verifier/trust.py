"""Trust scores (paper eq. 3), activation (eq. 4) and the two activation policies.

Paper eq. (3): ``S_i = acc_i * l_i / max(l) * w_i``, with ``acc_i`` the probe pass rate of
server ``i`` over a sliding window, ``l_i`` the number of blocks it hosts, ``max(l)`` the
largest span among the servers scored together, ``w_i`` a configurable weight (default 1).
Paper eq. (4): server ``i`` is active iff ``S_i >= theta``.

Two policies decide activation (:class:`TrustPolicy`); both use eq. (3) for reward shares.

- ``paper`` applies eq. (4) literally. Because ``S_i <= l_i / max(l)`` when ``w_i = 1``, an
  honest server that hosts 10 blocks beside one that hosts 30 scores at most 0.33 and is
  deactivated for any ``theta > 0.33``, however perfect its answers. It also acts on a single
  probe: one failure of a fresh server gives ``acc = 0``.
- ``robust`` (the default) decides from statistical confidence in ``acc_i`` alone, using the
  one-sided Wilson score interval at the configured confidence: an active server is deactivated
  only when the interval's *upper* bound is below ``theta`` (confidently bad); an inactive one
  is reactivated only when the *lower* bound reaches ``theta`` (confidently good). Span length
  and ``w_i`` do not affect activation, only reward shares. The hysteresis keeps a server from
  flapping around ``theta``.

With no probes in the window there is no evidence: both policies keep the previous state and the
score is 0 (no verified accuracy, no reward).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Iterable, Mapping, Sequence

from efedllm.dht.records import TrustVerdict


def trust_score(accuracy: float, blocks: int, max_blocks: int, weight: float = 1.0) -> float:
    """Paper eq. (3): ``S = acc * l / max(l) * w``."""
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
    if not (isinstance(blocks, int) and isinstance(max_blocks, int) and 1 <= blocks <= max_blocks):
        raise ValueError(f"need integers 1 <= blocks <= max_blocks, got blocks={blocks}, max_blocks={max_blocks}")
    if not (math.isfinite(weight) and weight >= 0.0):
        raise ValueError(f"weight must be a finite number >= 0, got {weight}")
    return accuracy * blocks / max_blocks * weight


def is_active_paper(score: float, theta: float) -> bool:
    """Paper eq. (4): active iff ``S >= theta``."""
    return score >= theta


def wilson_bounds(passed: int, probes: int, confidence: float) -> tuple[float, float]:
    """One-sided Wilson score bounds ``(lower, upper)`` of a pass rate at ``confidence``.

    Each bound alone holds with probability ``confidence``. With no probes, ``(0, 1)``.
    """
    if not (0 <= passed <= probes):
        raise ValueError(f"need 0 <= passed <= probes, got passed={passed}, probes={probes}")
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    if probes == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(confidence)
    rate, z2 = passed / probes, z * z
    denominator = 1.0 + z2 / probes
    centre = (rate + z2 / (2 * probes)) / denominator
    half_width = z * math.sqrt(rate * (1.0 - rate) / probes + z2 / (4 * probes * probes)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


@dataclass(frozen=True)
class ServerEvidence:
    """What a verifier knows about one server: its span length and its probe window."""

    peer_id: str
    blocks: int
    passed: int
    probes: int
    weight: float = 1.0
    was_active: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.passed <= self.probes:
            raise ValueError(f"server {self.peer_id}: need 0 <= passed <= probes, got {self.passed}/{self.probes}")
        if self.blocks < 1:
            raise ValueError(f"server {self.peer_id}: blocks must be >= 1, got {self.blocks}")

    @property
    def accuracy(self) -> float:
        return self.passed / self.probes if self.probes else 0.0


@dataclass(frozen=True)
class TrustDecision:
    """A policy's judgement of one server: eq. (3) score, activation and the pass-rate bounds."""

    peer_id: str
    accuracy: float
    score: float
    active: bool
    passed: int
    probes: int
    lower_bound: float
    upper_bound: float

    def to_verdict(self, verifier_key: str, timestamp: float, policy: str) -> TrustVerdict:
        return TrustVerdict(
            server_peer_id=self.peer_id,
            score=self.score,
            active=self.active,
            probes=self.probes,
            passed=self.passed,
            timestamp=timestamp,
            verifier_key=verifier_key,
            policy=policy,
        )


class TrustPolicy:
    """Decides activation from evidence and its eq. (3) score. Subclasses set ``name`` and ``is_active``."""

    name = ""

    def __init__(self, theta: float, confidence: float = 0.99) -> None:
        if not 0.0 < theta <= 1.0:
            raise ValueError(f"theta must be in (0, 1], got {theta}")
        wilson_bounds(0, 0, confidence)  # validates confidence
        self.theta, self.confidence = theta, confidence

    def is_active(self, evidence: ServerEvidence, score: float, lower: float, upper: float) -> bool:
        raise NotImplementedError


class PaperPolicy(TrustPolicy):
    """Eq. (4) as written: active iff ``S_i >= theta``."""

    name = "paper"

    def is_active(self, evidence: ServerEvidence, score: float, lower: float, upper: float) -> bool:
        return is_active_paper(score, self.theta)


class RobustPolicy(TrustPolicy):
    """Deactivate when confidently ``acc < theta``; reactivate when confidently ``acc >= theta``."""

    name = "robust"

    def is_active(self, evidence: ServerEvidence, score: float, lower: float, upper: float) -> bool:
        if evidence.was_active:
            return upper >= self.theta
        return lower >= self.theta


POLICIES: dict[str, type[TrustPolicy]] = {"paper": PaperPolicy, "robust": RobustPolicy}


def make_policy(name: str, theta: float, confidence: float = 0.99) -> TrustPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown trust policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name](theta, confidence)


def decide_trust(servers: Sequence[ServerEvidence], policy: TrustPolicy) -> list[TrustDecision]:
    """Score every server with eq. (3) (``max(l)`` over ``servers``) and let ``policy`` decide activation."""
    if not servers:
        return []
    max_blocks = max(server.blocks for server in servers)
    decisions = []
    for server in servers:
        score = trust_score(server.accuracy, server.blocks, max_blocks, server.weight)
        lower, upper = wilson_bounds(server.passed, server.probes, policy.confidence)
        active = server.was_active if server.probes == 0 else policy.is_active(server, score, lower, upper)
        decisions.append(
            TrustDecision(server.peer_id, server.accuracy, score, active, server.passed, server.probes, lower, upper)
        )
    return decisions


def reward_shares(scores: Mapping[str, float], reward: float) -> dict[str, float]:
    """Split ``reward`` in proportion to eq. (3) scores; servers with score 0 get nothing."""
    if not (math.isfinite(reward) and reward >= 0.0):
        raise ValueError(f"reward must be a finite number >= 0, got {reward}")
    if any(not (math.isfinite(score) and score >= 0.0) for score in scores.values()):
        raise ValueError("scores must be finite numbers >= 0")
    total = math.fsum(scores.values())
    if total == 0.0:
        return {}
    return {peer: reward * score / total for peer, score in sorted(scores.items()) if score > 0.0}


class ProbeWindow:
    """The last ``size`` probe outcomes of each server (the sliding window behind ``acc_i``)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.size = size
        self._outcomes: dict[str, collections.deque[bool]] = {}

    def record(self, peer_id: str, passed: bool) -> None:
        self._outcomes.setdefault(peer_id, collections.deque(maxlen=self.size)).append(bool(passed))

    def counts(self, peer_id: str) -> tuple[int, int]:
        """``(passed, probes)`` in the window; ``(0, 0)`` for a server never probed."""
        outcomes = self._outcomes.get(peer_id, ())
        return sum(outcomes), len(outcomes)

    def forget(self, peer_ids: Iterable[str]) -> None:
        for peer_id in peer_ids:
            self._outcomes.pop(peer_id, None)
