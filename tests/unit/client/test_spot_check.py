"""Pure parts of client spot checks and of spot-check evidence."""

from __future__ import annotations

import random

import pytest

from efedllm.client.routing import RouteHop, alternative_route, choose_route
from efedllm.client.spot_check import draw_spot_check, mismatch_evidence
from efedllm.common.errors import RecordError
from efedllm.common.spans import Span
from efedllm.dht.evidence import probe_order
from efedllm.dht.records import ServerInfo, ServerState, SpotCheckEvidence
from efedllm.models.comparison import ProbeComparison


def _server(peer: str, start: int, end: int) -> ServerInfo:
    return ServerInfo(peer, "m", Span(start, end), ServerState.ONLINE, 10.0, 1000, 4, "k", "0")


def test_draw_spot_check_follows_the_fraction():
    generator = random.Random(0)
    draws = [draw_spot_check(generator, 0.25) for _ in range(4000)]
    assert 0.22 < sum(draws) / len(draws) < 0.28
    assert not any(draw_spot_check(generator, 0.0) for _ in range(100))
    assert all(draw_spot_check(generator, 1.0) for _ in range(100))


def test_alternative_route_shares_no_server_or_is_none():
    servers = [_server("a", 0, 30), _server("b", 0, 15), _server("c", 15, 30)]
    route = lambda excluded: choose_route(servers, 30, excluded=excluded)  # noqa: E731
    primary = route(set())
    alternative = alternative_route(route, primary)
    assert alternative is not None
    assert not {hop.peer_id for hop in primary} & {hop.peer_id for hop in alternative}
    assert alternative_route(route, [RouteHop("a", Span(0, 30)), RouteHop("b", Span(0, 15))]) is None


def test_mismatch_evidence_names_both_chains_once():
    comparison = ProbeComparison(0.1, 2.0, 1.0, False, "off")
    evidence = mismatch_evidence([RouteHop("a", Span(0, 30))], [RouteHop("b", Span(0, 15)), RouteHop("c", Span(15, 30))],
                                 comparison, 3, "key")
    assert evidence.suspects == ("a", "b", "c") and evidence.tokens == 3
    assert SpotCheckEvidence.from_wire(evidence.to_wire()) == evidence


@pytest.mark.parametrize(("change", "message"), [
    ({"suspects": []}, "1..64 suspects"),
    ({"suspects": "abc"}, "must be a list"),
    ({"tokens": 0}, "tokens"),
    ({"version": 7}, "version"),
    ({"extra": 1}, "unknown field"),
])
def test_evidence_rejects_malformed_records(change, message):
    good = SpotCheckEvidence(("a",), 1, 0.5, 0.5, 1.0, "key").to_wire()
    with pytest.raises(RecordError, match=message):
        SpotCheckEvidence.from_wire({**good, **change})


def test_probe_order_puts_online_suspects_first_and_probes_them_twice():
    evidence = [SpotCheckEvidence(("c", "gone"), 1, 0.0, 1.0, 1.0, "key")]
    assert probe_order(["a", "b", "c"], evidence) == ["c", "a", "b", "c"]
    assert probe_order(["a", "b"], []) == ["a", "b"]
