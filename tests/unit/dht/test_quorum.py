"""Clients and servers obey only trusted verifiers, and only when a quorum of them agrees."""

import pytest

from efedllm.dht.quorum import QuorumRule, deactivated_peers
from efedllm.dht.records import TrustVerdict

KEYS = frozenset({"k1", "k2", "k3"})
NOW = 10_000.0


def verdict(server, key, active, timestamp=NOW - 10):
    return TrustVerdict(server, 0.5, active, 10, 5, timestamp, key, "robust")


def deactivated(verdicts, rule="majority", keys=KEYS, max_age=600.0):
    return deactivated_peers(verdicts, keys, QuorumRule.parse(rule) if isinstance(rule, str) else rule, NOW, max_age)


def test_majority_needs_more_than_half_of_configured_keys():
    two_votes = [verdict("x", "k1", False), verdict("x", "k2", False), verdict("x", "k3", True)]
    assert deactivated(two_votes) == {"x"}
    one_vote = [verdict("x", "k1", False)]
    assert deactivated(one_vote) == frozenset()  # the other two verifiers being silent does not help


@pytest.mark.parametrize("rule, expected", [("any", {"x"}), ("all", set()), ("2", {"x"}), ("3", set())])
def test_quorum_rules(rule, expected):
    votes = [verdict("x", "k1", False), verdict("x", "k2", False)]
    assert deactivated(votes, rule) == expected


def test_untrusted_keys_are_ignored():
    votes = [verdict("x", "intruder", False) for _ in range(5)] + [verdict("x", "k1", False)]
    assert deactivated(votes) == frozenset()
    assert deactivated(votes, "any") == {"x"}


def test_stale_and_future_verdicts_are_ignored():
    stale = [verdict("x", key, False, timestamp=NOW - 601) for key in KEYS]
    future = [verdict("x", key, False, timestamp=NOW + 3600) for key in KEYS]
    assert deactivated(stale) == frozenset()
    assert deactivated(future) == frozenset()
    assert deactivated([verdict("x", key, False, timestamp=NOW - 599) for key in KEYS]) == {"x"}


def test_newest_verdict_per_verifier_wins_and_counts_once():
    votes = [
        verdict("x", "k1", False, timestamp=NOW - 100),
        verdict("x", "k1", True, timestamp=NOW - 5),  # k1 changed its mind
        verdict("x", "k2", False, timestamp=NOW - 50),
        verdict("x", "k2", False, timestamp=NOW - 40),  # a repeat is still one vote
    ]
    assert deactivated(votes) == frozenset()
    assert deactivated(votes, "any") == {"x"}


def test_servers_are_judged_independently():
    votes = [verdict(server, key, server == "bad") for server in ("good", "bad") for key in ("k1", "k2")]
    assert deactivated(votes) == {"good"}


@pytest.mark.parametrize("rule", ["most", 0, -1, True, 1.5])
def test_invalid_quorum_rules_are_rejected(rule):
    with pytest.raises(ValueError, match="quorum"):
        QuorumRule(rule)


def test_quorum_larger_than_key_set_or_no_keys_is_an_error():
    with pytest.raises(ValueError, match="exceeds"):
        deactivated([], QuorumRule(4))
    with pytest.raises(ValueError, match="no trusted verifier keys"):
        deactivated([], "majority", keys=frozenset())
