from __future__ import annotations

import pytest

from efedllm.client.routing import (
    DEFAULT_RTT,
    MissingBlocksError,
    RouteHop,
    choose_checkable_route,
    choose_route,
    compress_ranges,
    per_block_seconds,
    route_cost,
    rtt_estimates,
    smoothed_rtt,
)
from efedllm.common.spans import Span
from efedllm.dht.records import ServerInfo, ServerState


def server(peer, start, end, throughput=100.0, state=ServerState.ONLINE, free=1000):
    return ServerInfo(peer, "m", Span(start, end), state, throughput, free, 4, "key", "0.1.0")


def test_covers_every_block_with_fewest_expensive_hops():
    servers = [server("a", 0, 10), server("b", 10, 20), server("c", 20, 30), server("big", 0, 30, throughput=10.0)]
    # "big" alone: 5 ms + 1/10 s = 105 ms; a, b, c: 3 * (5 ms + 10 ms) = 45 ms; mixes cost more
    assert [hop.peer_id for hop in choose_route(servers, 30)] == ["a", "b", "c"]
    slow_links = {"a": 0.1, "b": 0.1, "c": 0.1}  # now three hops cost 330 ms
    assert choose_route(servers, 30, rtt=slow_links) == [RouteHop("big", Span(0, 30))]


def test_uses_part_of_a_span_and_skips_unusable_servers():
    servers = [server("a", 0, 15), server("b", 10, 30), server("off", 0, 30, state=ServerState.OFFLINE),
               server("full", 0, 30, free=0), server("banned", 0, 30)]
    route = choose_route(servers, 30, excluded={"banned"}, min_free_tokens=10)
    assert route[0].blocks.start == 0 and route[-1].blocks.end == 30
    assert {hop.peer_id for hop in route} == {"a", "b"}
    assert all(route[i].blocks.end == route[i + 1].blocks.start for i in range(len(route) - 1))


def test_missing_blocks_are_named():
    with pytest.raises(MissingBlocksError, match="10-14, 20"):
        choose_route([server("a", 0, 10), server("b", 15, 20), server("c", 21, 30)], 30)
    assert compress_ranges([1, 2, 3, 7]) == "1-3, 7"


def test_checkable_route_leaves_a_disjoint_second_chain():
    # a tail measured fast makes "whole for blocks 0:15, then tail" the cheapest chain: it uses up both chains
    servers = [server("whole", 0, 30, throughput=50.0), server("head", 0, 15, throughput=60.0),
               server("tail", 15, 30, throughput=60.0)]
    measured = {"tail": 1.0 / (400.0 * 15)}
    cheapest = choose_route(servers, 30, measured=measured)
    assert [hop.peer_id for hop in cheapest] == ["whole", "tail"]
    checkable = choose_checkable_route(servers, 30, measured=measured)
    used = {hop.peer_id for hop in checkable}
    second = choose_route(servers, 30, excluded=used, measured=measured)
    assert not used & {hop.peer_id for hop in second}
    assert route_cost(checkable, servers, measured=measured) >= route_cost(cheapest, servers, measured=measured)


def test_an_announced_throughput_is_a_capped_prior_and_a_measurement_overrides_it():
    servers = [server("a", 0, 30, throughput=25.0), server("b", 0, 30, throughput=24.0),
               server("liar", 0, 30, throughput=1e6)]
    slow_liar = {"a": 0.001, "b": 0.001, "liar": 0.002}  # the liar's link is a little slower: its claim must not matter
    assert choose_route(servers, 30, rtt=slow_liar)[0].peer_id == "a"
    assert per_block_seconds(servers)["liar"] == per_block_seconds(servers)["a"]  # capped at the lower median
    measured = {"a": 0.01, "liar": 0.0001}  # but what the client timed itself counts
    assert choose_route(servers, 30, rtt=slow_liar, measured=measured)[0].peer_id == "liar"


def test_a_chain_visits_each_server_once():
    # with free round trips, splitting one server's span into two hops costs nothing: still refused
    servers = [server("a", 0, 30), server("b", 10, 20, throughput=1.0)]
    route = choose_route(servers, 30, rtt={"a": 0.0, "b": 0.0})
    assert len({hop.peer_id for hop in route}) == len(route)


def test_checkable_route_is_the_cheapest_when_no_disjoint_pair_exists():
    servers = [server("whole", 0, 30), server("head", 0, 15)]
    assert choose_checkable_route(servers, 30) == choose_route(servers, 30)
    with pytest.raises(MissingBlocksError):
        choose_checkable_route(servers, 30, excluded={"whole"})


def test_measured_round_trips_are_smoothed_and_bad_samples_refused():
    assert smoothed_rtt(None, 0.002) == 0.002
    assert smoothed_rtt(0.002, 0.012, weight=0.5) == pytest.approx(0.007)
    for bad in (-0.001, float("nan")):
        with pytest.raises(ValueError, match="round trip"):
            smoothed_rtt(0.002, bad)


def test_unmeasured_servers_get_the_median_round_trip():
    assert rtt_estimates({}, ["a", "b"]) == {"a": DEFAULT_RTT, "b": DEFAULT_RTT}
    estimates = rtt_estimates({"a": 0.001, "b": 0.003, "c": 0.2}, ["a", "new"])
    assert estimates == {"a": 0.001, "new": 0.003}


def test_a_measured_slow_link_moves_the_route_to_an_unmeasured_server():
    servers = [server("a", 0, 10), server("b", 10, 20), server("b2", 10, 20), server("c", 20, 30)]
    measured = {"a": 0.001, "b": 0.05, "c": 0.001}  # b2 not measured yet: assumed like the median, 1 ms
    route = choose_route(servers, 30, rtt=rtt_estimates(measured, [info.peer_id for info in servers]))
    assert [hop.peer_id for hop in route] == ["a", "b2", "c"]
