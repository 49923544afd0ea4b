"""Temporary bans with exponential backoff (pure: the caller passes the time).

A server that failed a step is avoided for ``base_s`` seconds, twice as long after each further
failure (at most ``max_s``), and used again once its ban ends; a success after that clears its
record. A permanent ban would let one peer's lie (or one bad minute of a server) remove an honest
server from a client for good; Petals, too, bans temporarily.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BanList:
    base_s: float = 15.0
    max_s: float = 600.0
    _until: dict[str, float] = field(default_factory=dict)
    _strikes: dict[str, int] = field(default_factory=dict)
    ever: set[str] = field(default_factory=set)  # every peer banned at least once (for reports)

    def ban(self, peer_id: str, now: float) -> float:
        """Bans ``peer_id`` from ``now``; returns how many seconds the ban lasts."""
        strikes = self._strikes.get(peer_id, 0)
        seconds = min(self.base_s * 2**strikes, self.max_s)
        self._strikes[peer_id] = strikes + 1
        self._until[peer_id] = now + seconds
        self.ever.add(peer_id)
        return seconds

    def banned(self, now: float) -> set[str]:
        return {peer for peer, until in self._until.items() if until > now}

    def succeeded(self, peer_id: str, now: float) -> None:
        """``peer_id`` served a session: once its ban is over, its past failures are forgiven."""
        if self._until.get(peer_id, 0.0) <= now:
            self._until.pop(peer_id, None)
            self._strikes.pop(peer_id, None)
