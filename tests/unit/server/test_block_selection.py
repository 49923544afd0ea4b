from __future__ import annotations

import pytest

from efedllm.common.spans import Span
from efedllm.dht.records import ServerInfo, ServerState
from efedllm.server.block_selection import block_coverage, choose_move, choose_window
from efedllm.server.swarm import even_spans, threads_per_server


def server(peer, start, end, state=ServerState.ONLINE):
    return ServerInfo(peer, "m", Span(start, end), state, 10.0, 100, 4, "key", "0.1.0")


def test_coverage_ignores_offline_and_excluded():
    servers = [server("a", 0, 3), server("b", 2, 5), server("c", 0, 5, ServerState.OFFLINE), server("d", 4, 6)]
    assert block_coverage(servers, 6, excluded={"d"}) == [1, 1, 2, 1, 1, 0]


def test_window_goes_where_the_swarm_is_thinnest():
    assert choose_window([2, 2, 0, 0, 0, 1], 3) == Span(2, 5)
    assert choose_window([1, 1, 1, 1], 2) == Span(0, 2)
    assert choose_window([0, 0, 0, 0, 0, 0], 6) == Span(0, 6)
    with pytest.raises(ValueError):
        choose_window([0, 0], 3)


def test_move_only_when_it_uncovers_nothing_and_gains():
    # without me, my blocks 0:2 are still served once and 4:6 by nobody: move there
    assert choose_move([1, 1, 1, 1, 0, 0], Span(0, 2)) == Span(4, 6)
    # leaving would uncover my blocks: stay
    assert choose_move([0, 1, 1, 1, 0, 0], Span(0, 2)) is None
    # balanced: stay
    assert choose_move([1, 1, 1, 1, 1, 1], Span(0, 2)) is None


def test_even_spans():
    assert [str(span) for span in even_spans(30, 3)] == ["0:10", "10:20", "20:30"]
    assert sum(span.length for span in even_spans(30, 4)) == 30


def test_threads_per_server_share_the_cores():
    assert threads_per_server(1, 2) == 2 and threads_per_server(3, 2) == 1 and threads_per_server(2, 16) == 8
    with pytest.raises(ValueError, match="servers >= 1"):
        threads_per_server(0, 2)
