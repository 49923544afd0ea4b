"""Session ownership and the KV-cache budget's admission rules, offline."""

from __future__ import annotations

import pytest

from efedllm.server.admission import (
    AccessError,
    AdmissionError,
    AdmissionPolicy,
    SessionLease,
    admit,
    check_access,
    free_tokens,
)

POLICY = AdmissionPolicy(budget_bytes=1000, max_sessions=4, max_sessions_per_peer=2, max_batch=4, peer_share=0.5,
                         evict_idle_s=30.0)


def test_only_the_owner_closes_and_only_owner_or_upstream_steps():
    lease = SessionLease("client", "hop1", 100, 1)
    check_access(lease, "s", "client")
    check_access(lease, "s", "hop1")
    check_access(lease, "s", "client", closing=True)
    with pytest.raises(AccessError, match="may not close"):
        check_access(lease, "s", "hop1", closing=True)
    with pytest.raises(AccessError, match="may not step"):
        check_access(lease, "s", "stranger")


def test_per_peer_limits_hold_however_free_the_server_is():
    leases = {"a1": SessionLease("A", None, 100, 1), "a2": SessionLease("A", None, 100, 1)}
    with pytest.raises(AdmissionError, match="already holds 2 sessions"):
        admit(POLICY, leases, {}, "A", 10)
    with pytest.raises(AdmissionError, match="share"):
        admit(POLICY, {}, {}, "B", 501)
    with pytest.raises(AdmissionError, match="batch 5"):
        admit(POLICY, {}, {}, "B", 10, batch=5)
    assert admit(POLICY, leases, {}, "B", 500) == []


def test_a_full_server_evicts_idle_sessions_of_the_biggest_holder_first():
    leases = {"a1": SessionLease("A", None, 400, 1), "b1": SessionLease("B", None, 300, 1),
              "c1": SessionLease("C", None, 200, 1)}
    idle = {"a1": 60.0, "b1": 120.0, "c1": 5.0}
    assert admit(POLICY, leases, idle, "D", 300) == ["a1"]  # A holds the most, though B idled longer
    with pytest.raises(AdmissionError, match="server is full"):
        admit(POLICY, leases, {"a1": 1.0, "b1": 1.0, "c1": 1.0}, "D", 300)  # nobody idle long enough
    four = {**leases, "c2": SessionLease("C", None, 50, 1)}
    assert admit(POLICY, four, idle, "D", 10) == ["a1"]  # bytes fit, but the session count is full


def test_free_tokens_count_reserved_bytes():
    assert free_tokens(POLICY, {"a": SessionLease("A", None, 400, 2)}, bytes_per_token=10) == 60
    assert free_tokens(POLICY, {"a": SessionLease("A", None, 1000, 1), "b": SessionLease("B", None, 50, 1)}, 10) == 0
