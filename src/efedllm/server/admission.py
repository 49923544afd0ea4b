"""Who may use a server's sessions, and how much of its KV-cache budget each peer may hold (pure).

A session belongs to the peer that opened it (libp2p authenticates the caller's peer id, so this
cannot be forged): only that owner may close it, and only the owner or the one ``upstream`` peer
the owner named at open (the previous hop of its chain) may step it. Knowing a session id is not
enough; an upstream hop learns the ids of sessions further down, but is not their upstream.

The cache budget is counted in bytes: ``batch × max_length × blocks × kv bytes`` per session,
reserved at open. One peer may hold at most ``max_sessions_per_peer`` sessions and
``peer_share`` of the budget. When a new session does not fit, sessions idle for at least
``evict_idle_s`` are evicted, those of the peer holding the most first (:func:`admit`), so one
peer's idle sessions cannot lock others out.

Call order (``efedllm.server.handler``): at open :func:`admit` (evict what it names, then open);
at every step and close :func:`check_access`.
"""

from __future__ import annotations

from dataclasses import dataclass

from efedllm.common.errors import EfedllmError


class AccessError(EfedllmError, PermissionError):
    """A peer acted on a session it does not own and is not the named upstream of."""


class AdmissionError(EfedllmError, ValueError):
    """A session that this server will not open now; the message says which limit."""


@dataclass(frozen=True)
class SessionLease:
    """What the server knows of an open session besides its cache: who may use it, what it reserved."""

    owner: str
    upstream: str | None
    reserved_bytes: int
    batch: int


@dataclass(frozen=True)
class AdmissionPolicy:
    budget_bytes: int
    max_sessions: int
    max_sessions_per_peer: int
    max_batch: int = 16
    max_step_tokens: int = 2048  # rows × tokens of one step: bounds the activations a single step may allocate
    peer_share: float = 0.5
    evict_idle_s: float = 30.0

    def __post_init__(self) -> None:
        if min(self.budget_bytes, self.max_sessions, self.max_sessions_per_peer, self.max_batch, self.max_step_tokens) < 1:
            raise ValueError("the cache budget, the session limits, max_batch and max_step_tokens must be >= 1")
        if not 0.0 < self.peer_share <= 1.0 or self.evict_idle_s < 0:
            raise ValueError(f"need 0 < peer_share <= 1 and evict_idle_s >= 0, got {self.peer_share}, {self.evict_idle_s}")


def check_access(lease: SessionLease, session_id: str, peer: str, closing: bool = False) -> None:
    """AccessError unless ``peer`` may step (or, with ``closing``, close) the session."""
    if peer == lease.owner or (not closing and peer == lease.upstream):
        return
    action = "close" if closing else "step"
    raise AccessError(f"peer {peer} may not {action} session {session_id!r}: it belongs to another peer")


def admit(policy: AdmissionPolicy, leases: dict[str, SessionLease], idle_s: dict[str, float],
          peer: str, request_bytes: int, batch: int = 1) -> list[str]:
    """The sessions to evict so that ``peer`` may reserve ``request_bytes`` (often none); AdmissionError if
    the request breaks a per-peer limit or cannot fit even after evicting every idle session."""
    held = [lease for lease in leases.values() if lease.owner == peer]
    if batch > policy.max_batch:
        raise AdmissionError(f"batch {batch} exceeds this server's limit of {policy.max_batch} rows per session")
    if len(held) >= policy.max_sessions_per_peer:
        raise AdmissionError(f"peer {peer} already holds {len(held)} sessions here, the most one peer may hold")
    if sum(lease.reserved_bytes for lease in held) + request_bytes > policy.peer_share * policy.budget_bytes:
        raise AdmissionError(f"the session would take peer {peer} past its share of this server's KV-cache budget "
                             f"({policy.peer_share:.0%} of {policy.budget_bytes} bytes)")
    if request_bytes > policy.budget_bytes:
        raise AdmissionError(f"the session needs {request_bytes} bytes of KV cache; this server's budget is "
                             f"{policy.budget_bytes}")
    evicted, free, count = [], policy.budget_bytes - _reserved(leases), len(leases)
    for session_id in _eviction_order(leases, idle_s, policy.evict_idle_s):
        if request_bytes <= free and count < policy.max_sessions:
            break
        evicted.append(session_id)
        free, count = free + leases[session_id].reserved_bytes, count - 1
    if request_bytes > free or count >= policy.max_sessions:
        raise AdmissionError(f"server is full: {len(leases)} sessions hold {_reserved(leases)} of "
                             f"{policy.budget_bytes} bytes of KV cache and none has been idle {policy.evict_idle_s:.0f} s")
    return evicted


def free_tokens(policy: AdmissionPolicy, leases: dict[str, SessionLease], bytes_per_token: int) -> int:
    """How many more batch-1 tokens of cache fit in the budget (what the server announces)."""
    return max(0, policy.budget_bytes - _reserved(leases)) // max(1, bytes_per_token)


def _reserved(leases: dict[str, SessionLease]) -> int:
    return sum(lease.reserved_bytes for lease in leases.values())


def _eviction_order(leases: dict[str, SessionLease], idle_s: dict[str, float], min_idle_s: float) -> list[str]:
    """Idle sessions, those of the peer holding the most bytes first, then the longest idle first."""
    by_owner: dict[str, int] = {}
    for lease in leases.values():
        by_owner[lease.owner] = by_owner.get(lease.owner, 0) + lease.reserved_bytes
    idle = [session_id for session_id in leases if idle_s.get(session_id, 0.0) >= min_idle_s]
    return sorted(idle, key=lambda session_id: (-by_owner[leases[session_id].owner], -idle_s.get(session_id, 0.0)))
