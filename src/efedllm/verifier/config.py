"""The verifier's configuration: one frozen dataclass, validated on creation; the CLI only builds it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from efedllm.dht.quorum import QuorumRule
from efedllm.models.comparison import DEFAULT_TOLERANCES, Tolerances
from efedllm.verifier.ledger import default_ledger_path
from efedllm.verifier.trust import POLICIES, TrustPolicy, make_policy, wilson_bounds

# decode steps per probe after its prefill (the verifier node's default, see VerifierNodeConfig)
DEFAULT_PROBE_DECODE_STEPS = 8
# Same weights, same dtype, same kernels: prefill-vs-decode and batching differences stay ~1e-5.
SAME_DTYPE_TOLERANCES = Tolerances(min_cosine=0.99999, max_relative_l2=2e-3, max_off_fraction=0.0, hard_max_relative_l2=2e-3)
# Training gradients of a server in the reference's dtype: the same code, sums reordered by threads (~1e-6 seen).
SAME_DTYPE_GRADIENT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class VerifierConfig:
    """Everything a verifier node decides with.

    Attributes:
        theta: threshold θ of paper eq. (4), in (0, 1]. Under ``paper`` it bounds the eq. (3)
            score; under ``robust`` it bounds the probe pass rate.
        weights: per-server weight ``w_i`` of eq. (3) by peer id (a mapping is accepted and stored
            as sorted pairs); servers not listed get ``default_weight``.
        default_weight: ``w_i`` of servers not in ``weights`` (paper: 1).
        policy: ``"robust"`` (default: activation from a confidence bound on the pass rate) or
            ``"paper"`` (eq. (4) literally); see :mod:`efedllm.verifier.trust`.
        window: how many recent probes per server make up ``acc_i``.
        tolerances: when a probe passes; see :mod:`efedllm.models.comparison`.
        confidence: one-sided confidence of the ``robust`` policy's Wilson bounds, in (0.5, 1).
            At 0.99 and θ = 0.8 a fresh server is deactivated after 2 failed probes out of 2, an
            established one once its window's pass rate is confidently below θ.
        probe_interval_s: seconds between probe rounds.
        epoch_seconds: length of a reward epoch in seconds.
        reward_per_epoch: reward units split among eligible servers each epoch.
        ledger_path: the SQLite ledger file.
        trusted_verifier_keys: public keys (hex DER) whose verdicts clients and servers obey.
        quorum: how many trusted verifiers must agree to deactivate a server.
        verdict_max_age_s: verdicts older than this are ignored by clients and servers.
        clawback_epochs: a proven lie (:mod:`efedllm.verifier.audit`) forfeits the liar's unpaid work and
            claws back its credit of the current and this many previous epochs. Why that far: at the
            client default ``audit_fraction`` 0.5 a cheater survives K of its corrupted sessions with
            probability 0.5**K, so its lies are recent (7 sessions for 99%), but a cheater that lies
            rarely can go on for long; a day of hourly epochs covers what a verifier can still
            attribute without claiming credit that honest work of other days earned.
        gradient_tolerance: the largest relative L2 error of any gradient a training audit accepts from a
            server computing in another dtype than the reference (:mod:`efedllm.verifier.training_audit`);
            in the same dtype ``SAME_DTYPE_GRADIENT_TOLERANCE``.
    """

    theta: float = 0.8
    weights: tuple[tuple[str, float], ...] | Mapping[str, float] = ()
    default_weight: float = 1.0
    policy: str = "robust"
    window: int = 50
    tolerances: Tolerances = DEFAULT_TOLERANCES
    confidence: float = 0.99
    probe_interval_s: float = 30.0
    epoch_seconds: float = 3600.0
    reward_per_epoch: float = 100.0
    ledger_path: Path = field(default_factory=default_ledger_path)
    trusted_verifier_keys: frozenset[str] = frozenset()
    quorum: QuorumRule = QuorumRule("majority")
    verdict_max_age_s: float = 600.0
    clawback_epochs: int = 24
    gradient_tolerance: float = 0.05

    def __post_init__(self) -> None:
        weights = self.weights.items() if isinstance(self.weights, Mapping) else self.weights
        object.__setattr__(self, "weights", tuple(sorted((str(peer), float(weight)) for peer, weight in weights)))
        object.__setattr__(self, "ledger_path", Path(self.ledger_path))
        object.__setattr__(self, "trusted_verifier_keys", frozenset(self.trusted_verifier_keys))
        if not isinstance(self.quorum, QuorumRule):
            object.__setattr__(self, "quorum", QuorumRule.parse(str(self.quorum)))
        self._validate()

    def _validate(self) -> None:
        if not (isinstance(self.theta, (int, float)) and 0.0 < self.theta <= 1.0):
            raise ValueError(f"theta must be in (0, 1], got {self.theta!r}")
        for peer, weight in self.weights + (("default_weight", self.default_weight),):
            if not (math.isfinite(weight) and weight >= 0.0):
                raise ValueError(f"weight of {peer} must be a finite number >= 0, got {weight}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        if not (isinstance(self.window, int) and self.window >= 1):
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if not isinstance(self.tolerances, Tolerances):
            raise ValueError(f"tolerances must be a Tolerances, got {type(self.tolerances).__name__}")
        wilson_bounds(0, 0, self.confidence)
        for name in ("probe_interval_s", "epoch_seconds", "verdict_max_age_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not (isinstance(self.clawback_epochs, int) and self.clawback_epochs >= 0):
            raise ValueError(f"clawback_epochs must be an integer >= 0, got {self.clawback_epochs!r}")
        if not (isinstance(self.gradient_tolerance, (int, float)) and 0 < self.gradient_tolerance < 1):
            raise ValueError(f"gradient_tolerance must be in (0, 1), got {self.gradient_tolerance!r}")
        if not (math.isfinite(self.reward_per_epoch) and self.reward_per_epoch >= 0):
            raise ValueError(f"reward_per_epoch must be a finite number >= 0, got {self.reward_per_epoch!r}")
        if not all(isinstance(key, str) and key for key in self.trusted_verifier_keys):
            raise ValueError("trusted_verifier_keys must be non-empty strings (hex DER public keys)")
        if self.trusted_verifier_keys:
            self.quorum.required_votes(len(self.trusted_verifier_keys))  # e.g. a quorum of 3 with 2 keys

    def weight(self, peer_id: str) -> float:
        """``w_i`` of eq. (3) for one server."""
        return dict(self.weights).get(peer_id, self.default_weight)

    def make_policy(self) -> TrustPolicy:
        return make_policy(self.policy, self.theta, self.confidence)
