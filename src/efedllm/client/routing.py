"""Choosing a chain of servers that covers every block at the least expected latency (pure).

Each hop costs the round trip to its server plus its time for the blocks it runs:
``rtt + blocks · seconds_per_block``. ``seconds_per_block`` is what this client measured of the
server (``step_seconds``, from relayed steps) when it has; otherwise the server's announced
throughput serves as a prior, its blocks per second capped at the lower median of all servers'
claims (:func:`per_block_seconds`), so a server that announces 1e6 tokens/s looks no faster than a
typical one and cannot attract every route by lying. A dynamic program over block boundaries finds
the cheapest chain, visiting each server at most once; servers that are offline, full, banned or
deactivated are skipped. Unknown round trips default to ``default_rtt``. A client measures the
round trip of every session it opens (``smoothed_rtt``) and, for servers it has not measured yet,
assumes the median of those it has (``rtt_estimates``), so a server is not avoided merely for
being new.
"""

from __future__ import annotations

from dataclasses import dataclass

from efedllm.common.errors import EfedllmError
from efedllm.common.spans import Span
from efedllm.dht.records import ServerInfo, ServerState

DEFAULT_RTT = 0.005


def smoothed_rtt(previous: float | None, sample: float, weight: float = 0.3) -> float:
    """Exponential moving average of round-trip times in seconds: ``weight`` is the new sample's share."""
    if not sample >= 0.0:
        raise ValueError(f"a round trip must be >= 0 s, got {sample}")
    return sample if previous is None else (1.0 - weight) * previous + weight * sample


def rtt_estimates(measured: dict[str, float], peer_ids, default_rtt: float = DEFAULT_RTT) -> dict[str, float]:
    """A round trip for every peer: its measured one, else the median of the measured ones, else ``default_rtt``."""
    known = sorted(measured.values())
    fallback = known[len(known) // 2] if known else default_rtt
    return {peer_id: measured.get(peer_id, fallback) for peer_id in peer_ids}


class MissingBlocksError(EfedllmError, RuntimeError):
    """No chain of usable servers covers every block."""

    def __init__(self, missing: list[int]) -> None:
        self.missing = missing
        super().__init__(f"no usable server hosts block(s) {compress_ranges(missing)}")


def compress_ranges(blocks: list[int]) -> str:
    ranges, start = [], None
    for index, block in enumerate(blocks):
        start = block if start is None else start
        if index + 1 == len(blocks) or blocks[index + 1] != block + 1:
            ranges.append(f"{start}" if start == block else f"{start}-{block}")
            start = None
    return ", ".join(ranges)


@dataclass(frozen=True)
class RouteHop:
    peer_id: str
    blocks: Span


def usable(info: ServerInfo, excluded: set[str], min_free_tokens: int) -> bool:
    return info.state is ServerState.ONLINE and info.peer_id not in excluded and info.free_cache_tokens >= min_free_tokens


def per_block_seconds(servers: list[ServerInfo], measured: dict[str, float] | None = None) -> dict[str, float]:
    """Peer -> seconds per block of a decode step: measured when known, else the capped announcement."""
    measured = measured or {}
    claims = sorted(info.throughput * info.span.length for info in servers)  # blocks per second each claims
    cap = claims[(len(claims) - 1) // 2] if claims else 0.0  # the lower median: a lying minority cannot raise it
    return {info.peer_id: measured.get(info.peer_id, 1.0 / max(min(info.throughput * info.span.length, cap), 1e-6))
            for info in servers}


def hop_cost(info: ServerInfo, blocks: Span, rtt: dict[str, float], per_block: dict[str, float],
             default_rtt: float = DEFAULT_RTT) -> float:
    return rtt.get(info.peer_id, default_rtt) + blocks.length * per_block[info.peer_id]


def choose_route(
    servers: list[ServerInfo],
    num_blocks: int,
    rtt: dict[str, float] | None = None,
    excluded: set[str] = frozenset(),
    min_free_tokens: int = 0,
    measured: dict[str, float] | None = None,
) -> list[RouteHop]:
    """The cheapest chain covering blocks ``0..num_blocks-1``; raises MissingBlocksError if none.

    ``measured``: peer -> seconds per block this client timed (see :func:`per_block_seconds`)."""
    rtt = rtt or {}
    candidates = [info for info in servers if usable(info, excluded, min_free_tokens)]
    per_block = per_block_seconds(candidates, measured)
    best: list[tuple[float, list[RouteHop]] | None] = [None] * (num_blocks + 1)
    best[0] = (0.0, [])
    for start in range(num_blocks):
        if best[start] is None:
            continue
        cost_so_far, hops = best[start]
        for info in candidates:
            if not info.span.start <= start < info.span.end or any(hop.peer_id == info.peer_id for hop in hops):
                continue  # a chain visits each server once: servers reject steps that come back to them
            for end in range(start + 1, min(info.span.end, num_blocks) + 1):
                blocks = Span(start, end)
                cost = cost_so_far + hop_cost(info, blocks, rtt, per_block)
                if best[end] is None or cost < best[end][0]:
                    best[end] = (cost, hops + [RouteHop(info.peer_id, blocks)])
    if best[num_blocks] is None:
        covered = {block for info in candidates for block in range(info.span.start, info.span.end)}
        raise MissingBlocksError([block for block in range(num_blocks) if block not in covered] or [num_blocks - 1])
    return best[num_blocks][1]


def route_cost(route: list[RouteHop], servers: list[ServerInfo], rtt: dict[str, float] | None = None,
               measured: dict[str, float] | None = None) -> float:
    by_peer, per_block = {info.peer_id: info for info in servers}, per_block_seconds(servers, measured)
    return sum(hop_cost(by_peer[hop.peer_id], hop.blocks, rtt or {}, per_block) for hop in route)


def choose_checkable_route(
    servers: list[ServerInfo],
    num_blocks: int,
    rtt: dict[str, float] | None = None,
    excluded: set[str] = frozenset(),
    min_free_tokens: int = 0,
    measured: dict[str, float] | None = None,
) -> list[RouteHop]:
    """The cheapest chain that leaves a second chain sharing none of its servers, for client spot
    checks; the cheapest chain when no such pair is found.

    The plain cheapest chain can take a server's part of a span and so use up both disjoint chains
    a swarm has (a whole-model server for blocks 0:15, then a tail): every spot check would then be
    skipped. Candidates are the cheapest chain and the cheapest chains without one of its servers.
    """
    def route(without: set[str]) -> list[RouteHop]:
        return choose_route(servers, num_blocks, rtt, set(excluded) | without, min_free_tokens, measured)

    cheapest = route(set())
    candidates = [cheapest]
    for peer_id in dict.fromkeys(hop.peer_id for hop in cheapest):
        try:
            candidates.append(route({peer_id}))
        except MissingBlocksError:
            continue
    checkable = [candidate for candidate in candidates if alternative_route(route, candidate) is not None]
    return min(checkable, key=lambda candidate: route_cost(candidate, servers, rtt, measured)) if checkable else cheapest


def alternative_route(find_route, primary: list[RouteHop]) -> list[RouteHop] | None:
    """A chain avoiding every server of ``primary`` (``find_route(excluded)`` routes), or None."""
    try:
        return find_route({hop.peer_id for hop in primary})
    except MissingBlocksError:
        return None
