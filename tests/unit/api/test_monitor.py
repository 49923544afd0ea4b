"""The monitor's snapshot: coverage, gaps, states, measured times and verdicts (pure)."""

from __future__ import annotations

from efedllm.api.engine import EngineStats
from efedllm.api.metrics import ApiMetrics
from efedllm.api.monitor import block_hosts, swarm_snapshot
from efedllm.common.spans import Span
from efedllm.dht.records import ServerInfo, ServerState, TrustVerdict

STATS = EngineStats(active_rows=2, opening_rows=0, waiting_jobs=1, tokens_per_s=3.5, tokens_total=70, steps_total=40)


def server(peer: str, start: int, end: int, state=ServerState.ONLINE) -> ServerInfo:
    return ServerInfo(peer, "m", Span(start, end), state, 50.0, 1000, 4, "key", "0.1.0")


def test_gaps_deactivated_servers_and_measurements():
    servers = {info.peer_id: info for info in (server("a", 0, 4), server("b", 4, 8), server("c", 8, 10, ServerState.JOINING),
                                               server("d", 0, 10))}
    verdict = TrustVerdict("d", 0.1, False, 10, 1, 100.0, "00ff", "paper")
    snapshot = swarm_snapshot("m", 10, servers, {"a": 0.004}, {"a": 0.002}, {"d"}, {"b"}, [verdict], {"00ff"}, {"a": 1.5},
                              STATS)
    assert snapshot["gaps"] == [8, 9] and snapshot["gaps_text"] == "8-9"  # c is joining, d deactivated
    assert snapshot["blocks"][0] == ["a"] and snapshot["blocks"][5] == ["b"]
    rows = {row["peer_id"]: row for row in snapshot["servers"]}
    assert rows["a"]["rtt_ms"] == 4.0 and rows["a"]["step_ms"] == 8.0 and rows["a"]["balance"] == 1.5
    assert rows["b"]["rtt_ms"] is None and rows["b"]["banned_here"] and rows["b"]["balance"] == 0.0
    assert rows["d"]["state"] == "deactivated" and rows["d"]["verdicts"][0]["trusted"]
    assert rows["d"]["verdicts"][0]["active"] is False and rows["c"]["state"] == "joining"
    assert snapshot["serving"]["tokens_per_s"] == 3.5 and snapshot["serving"]["waiting_requests"] == 1


def test_no_ledger_and_no_servers():
    snapshot = swarm_snapshot("m", 3, {}, {}, {}, set(), set(), [], set(), None, STATS)
    assert snapshot["gaps"] == [0, 1, 2] and snapshot["servers"] == [] and snapshot["ledger"] is False


def test_block_hosts_count_only_online_servers_not_deactivated():
    servers = {info.peer_id: info for info in (server("a", 0, 2), server("b", 2, 4, ServerState.JOINING), server("d", 0, 4))}
    assert block_hosts(4, servers, {"d"}) == [["a"], ["a"], [], []]
    assert block_hosts(4, servers, set()) == [["a", "d"], ["a", "d"], ["d"], ["d"]]


class CountingEngine:
    def __init__(self) -> None:
        self.reads = 0

    def stats(self) -> EngineStats:
        self.reads += 1
        return STATS


def test_engine_gauges_read_one_snapshot_per_scrape():
    metrics, engine = ApiMetrics(), CountingEngine()
    metrics.watch_engine(engine)
    assert engine.reads == 0  # registering reads nothing
    text = metrics.exposition().decode()
    assert "efedllm_api_active_rows 2.0" in text and "efedllm_api_waiting_requests 1.0" in text
    assert engine.reads == 1
