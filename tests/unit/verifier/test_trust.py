"""Paper eqs. (3)-(4), the Wilson bounds, the two policies and where they differ, reward shares."""

import math

import pytest

from efedllm.verifier.trust import (
    ProbeWindow,
    ServerEvidence,
    decide_trust,
    is_active_paper,
    make_policy,
    reward_shares,
    trust_score,
    wilson_bounds,
)

Z99_SQUARED = 2.3263478740408408**2


@pytest.mark.parametrize(
    "accuracy, blocks, max_blocks, weight, expected",
    [(1.0, 30, 30, 1.0, 1.0), (0.9, 10, 30, 1.0, 0.3), (1.0, 10, 30, 1.0, 1 / 3), (0.5, 15, 30, 0.8, 0.2), (0.0, 30, 30, 1.0, 0.0)],
)
def test_trust_score_matches_hand_computed_eq3(accuracy, blocks, max_blocks, weight, expected):
    assert trust_score(accuracy, blocks, max_blocks, weight) == pytest.approx(expected)


@pytest.mark.parametrize("arguments", [(1.5, 1, 1), (-0.1, 1, 1), (1.0, 0, 1), (1.0, 31, 30), (1.0, 1, 1, -1.0), (1.0, 1, 1, math.nan)])
def test_trust_score_rejects_out_of_range_inputs(arguments):
    with pytest.raises(ValueError):
        trust_score(*arguments)


def test_eq4_is_active_iff_score_at_least_theta():
    assert is_active_paper(0.8, 0.8)
    assert is_active_paper(0.81, 0.8)
    assert not is_active_paper(0.7999, 0.8)


def test_wilson_bounds_match_closed_forms():
    # With no passes the upper bound is z^2 / (n + z^2); with all passes the lower bound is n / (n + z^2).
    assert wilson_bounds(0, 2, 0.99) == pytest.approx((0.0, Z99_SQUARED / (2 + Z99_SQUARED)))
    assert wilson_bounds(50, 50, 0.99)[0] == pytest.approx(50 / (50 + Z99_SQUARED))
    assert wilson_bounds(0, 0, 0.99) == (0.0, 1.0)
    lower, upper = wilson_bounds(35, 50, 0.99)
    assert lower < 0.7 < upper
    with pytest.raises(ValueError):
        wilson_bounds(3, 2, 0.99)
    with pytest.raises(ValueError):
        wilson_bounds(1, 2, 1.0)


def _decisions(policy_name, servers, theta=0.8):
    return {d.peer_id: d for d in decide_trust(servers, make_policy(policy_name, theta, 0.99))}


def test_paper_and_robust_differ_on_honest_short_span():
    """The documented difference: eq. (4) deactivates a perfect server that hosts fewer blocks."""
    servers = [
        ServerEvidence("long", blocks=30, passed=50, probes=50),
        ServerEvidence("short-honest", blocks=10, passed=50, probes=50),
        ServerEvidence("short-faulty", blocks=10, passed=0, probes=50),
    ]
    paper, robust = _decisions("paper", servers), _decisions("robust", servers)
    # Same eq. (3) scores under both policies.
    for peer in ("long", "short-honest", "short-faulty"):
        assert paper[peer].score == robust[peer].score
    assert robust["short-honest"].score == pytest.approx(1 / 3)  # <= l_i / max(l)
    assert {p for p, d in paper.items() if d.active} == {"long"}
    assert {p for p, d in robust.items() if d.active} == {"long", "short-honest"}
    # Rewards follow eq. (3) among active servers: 1 : 1/3 under robust.
    shares = reward_shares({p: d.score for p, d in robust.items() if d.active}, 100.0)
    assert shares == pytest.approx({"long": 75.0, "short-honest": 25.0})


def test_paper_acts_on_one_failed_probe_robust_waits_for_confidence():
    fresh = [ServerEvidence("a", blocks=10, passed=0, probes=1)]
    assert not _decisions("paper", fresh)["a"].active
    assert _decisions("robust", fresh)["a"].active  # upper bound z^2/(1+z^2) = 0.844 >= 0.8
    two_failures = [ServerEvidence("a", blocks=10, passed=0, probes=2)]
    assert not _decisions("robust", two_failures)["a"].active  # upper bound 0.730 < 0.8


def test_robust_hysteresis_reactivates_only_when_confidently_good():
    def robust_active(passed, probes, was_active):
        return _decisions("robust", [ServerEvidence("a", 10, passed, probes, was_active=was_active)])["a"].active

    assert robust_active(10, 10, was_active=True)
    assert not robust_active(10, 10, was_active=False)  # lower bound 10 / (10 + z^2) = 0.649 < 0.8
    assert robust_active(50, 50, was_active=False)  # lower bound 0.902 >= 0.8
    assert not robust_active(20, 50, was_active=True)  # intermittent at 60% failures: upper < 0.8


def test_no_probes_keeps_previous_state_and_scores_zero():
    for name in ("paper", "robust"):
        decisions = _decisions(name, [ServerEvidence("new", 5, 0, 0, was_active=True), ServerEvidence("off", 5, 0, 0, was_active=False)])
        assert decisions["new"].active and not decisions["off"].active
        assert decisions["new"].score == 0.0


def test_weight_scales_the_score_and_verdict_record():
    decision = _decisions("paper", [ServerEvidence("a", 30, 45, 50, weight=0.5)])["a"]
    assert decision.score == pytest.approx(0.45)
    verdict = decision.to_verdict(verifier_key="ab12", timestamp=1000.0, policy="paper")
    assert (verdict.server_peer_id, verdict.passed, verdict.probes, verdict.active) == ("a", 45, 50, False)


def test_unknown_policy_and_bad_theta_are_rejected():
    with pytest.raises(ValueError, match="unknown trust policy"):
        make_policy("lenient", 0.8)
    with pytest.raises(ValueError, match="theta"):
        make_policy("robust", 0.0)


def test_reward_shares_are_proportional_and_skip_zero_scores():
    assert reward_shares({"a": 0.5, "b": 1.5, "c": 0.0}, 8.0) == pytest.approx({"a": 2.0, "b": 6.0})
    assert reward_shares({"a": 0.0}, 8.0) == {}
    with pytest.raises(ValueError):
        reward_shares({"a": -1.0}, 8.0)


def test_probe_window_keeps_only_the_last_outcomes():
    window = ProbeWindow(3)
    for outcome in (False, False, True, True, True):
        window.record("a", outcome)
    assert window.counts("a") == (3, 3)
    window.record("a", False)
    assert window.counts("a") == (2, 3)
    assert window.counts("never-probed") == (0, 0)
    window.forget(["a"])
    assert window.counts("a") == (0, 0)
