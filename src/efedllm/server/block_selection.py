"""Which blocks a server should host (pure functions, unit-tested).

Coverage counts the online servers hosting each block. A joining server takes the k-block
window that the swarm covers least; a running server moves when some block is uncovered (or
far less covered than its own blocks) and leaving its window uncovers nothing.
"""

from __future__ import annotations

from efedllm.common.spans import Span
from efedllm.dht.records import ServerInfo, ServerState


def block_coverage(servers: list[ServerInfo], num_blocks: int, excluded: set[str] = frozenset()) -> list[int]:
    coverage = [0] * num_blocks
    for info in servers:
        if info.state is ServerState.OFFLINE or info.peer_id in excluded:
            continue
        for block in range(info.span.start, min(info.span.end, num_blocks)):
            coverage[block] += 1
    return coverage


def choose_window(coverage: list[int], length: int) -> Span:
    """The window whose least-covered block is least covered; ties: smaller total, then leftmost."""
    if not 1 <= length <= len(coverage):
        raise ValueError(f"cannot host {length} blocks of a {len(coverage)}-block model")
    scores = [
        (min(coverage[start:start + length]), sum(coverage[start:start + length]), start)
        for start in range(len(coverage) - length + 1)
    ]
    start = min(scores)[2]
    return Span(start, start + length)


def choose_move(coverage_without_me: list[int], current: Span, min_gain: int = 2) -> Span | None:
    """Where a running server should move, or None to stay.

    It moves when the best window's weakest block is covered at least ``min_gain`` times less
    than its current window's weakest block would be without it (an uncovered block vs. blocks
    that others also serve), and never if leaving uncovers one of its own blocks.
    """
    own = coverage_without_me[current.start:current.end]
    if min(own) == 0:
        return None
    target = choose_window(coverage_without_me, current.length)
    if target == current:
        return None
    gain = min(own) - min(coverage_without_me[target.start:target.end])
    return target if gain >= min_gain or min(coverage_without_me[target.start:target.end]) == 0 else None
