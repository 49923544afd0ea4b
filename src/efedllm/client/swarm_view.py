"""What a client knows of the swarm: server records, verdicts, round trips it measured, peers it banned.

One :class:`SwarmView` per client; every session is given it (as Petals' sessions are given a
``RemoteSequenceManager``) to choose chains, to ban a server that failed and to record round
trips. It reads the DHT only in :meth:`SwarmView.refresh`, which a background task may call while
sessions call it too: the two take turns (a lock). The decisions themselves are the pure functions
of :mod:`efedllm.client.routing`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from hivemind.dht import DHT

from efedllm.client.bans import BanList
from efedllm.client.config import RemoteClientConfig
from efedllm.client.routing import (
    MissingBlocksError,
    RouteHop,
    alternative_route,
    choose_checkable_route,
    choose_route,
    rtt_estimates,
    smoothed_rtt,
)
from efedllm.dht.records import ServerInfo
from efedllm.dht.servers import fetch_servers
from efedllm.dht.verdicts import deactivated_peers_in_dht

logger = logging.getLogger(__name__)


class SwarmView:
    """The servers of ``model`` as this client sees them. The constructor does no I/O."""

    def __init__(self, dht: DHT, model: str, num_blocks: int, config: RemoteClientConfig) -> None:
        self.dht, self.model, self.num_blocks, self.config = dht, model, num_blocks, config
        self.servers: dict[str, ServerInfo] = {}
        self.bans = BanList()
        self.rtt: dict[str, float] = {}
        self.step_seconds: dict[str, float] = {}  # peer -> measured seconds per decode step per block
        self._deactivated: set[str] = set()
        self._read_at: float | None = None  # time.monotonic() of the last read
        self._lock = threading.Lock()

    def refresh(self, max_age: float = 0.0) -> None:
        """Read the server records and verdicts from the DHT, unless the last read is at most ``max_age`` s old."""
        with self._lock:
            if self._read_at is not None and time.monotonic() - self._read_at <= max_age:
                return
            read_at = time.monotonic()
            self.servers = fetch_servers(self.dht, self.model, self.num_blocks)
            self._deactivated = deactivated_peers_in_dht(self.dht, self.model, self.servers.keys(),
                                                         self.config.trusted_verifier_keys, self.config.verifier_quorum)
            self._read_at = read_at

    async def refresh_periodically(self, interval: float) -> None:
        """Keeps the view younger than ``server_view_max_age`` between sessions (runs until cancelled)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            try:
                await loop.run_in_executor(None, self.refresh, interval / 2)
            except Exception as error:  # the DHT may be unreachable for a while: the next period retries
                logger.info("background refresh of the server view failed: %r", error)

    def deactivated_peers(self) -> set[str]:
        """Peers a quorum of trusted verifiers deactivated, as of the last ``refresh()``."""
        return set(self._deactivated)

    @property
    def banned(self) -> set[str]:
        """Servers this client avoids now: they failed a step recently (temporary bans, :mod:`efedllm.client.bans`)."""
        return self.bans.banned(time.monotonic())

    def ban(self, peer_id: str) -> float:
        """Avoid ``peer_id`` for a while (longer after each failure); returns the ban's seconds."""
        seconds = self.bans.ban(peer_id, time.monotonic())
        logger.info("avoiding %s for %.0f s", peer_id, seconds)
        return seconds

    def served(self, peer_id: str) -> None:
        """``peer_id`` served a session: once its ban is over, its past failures are forgiven."""
        self.bans.succeeded(peer_id, time.monotonic())

    def record_step_time(self, peer_id: str, seconds: float, blocks: int) -> None:
        """A decode step this client timed on one hop (relayed): routing prefers it over the server's claim."""
        self.step_seconds[peer_id] = smoothed_rtt(self.step_seconds.get(peer_id), seconds / max(1, blocks))

    def record_rtt(self, peer_id: str, seconds: float) -> None:
        """A measured round trip (a session opened on ``peer_id``); routing uses the moving average."""
        self.rtt[peer_id] = smoothed_rtt(self.rtt.get(peer_id), seconds)

    def find_route(self, excluded: set[str], max_length: int = 0, leave_disjoint: bool = False) -> list[RouteHop]:
        """The cheapest chain; with ``leave_disjoint``, the cheapest that leaves a disjoint second chain."""
        choose = choose_checkable_route if leave_disjoint else choose_route
        excluded = set(excluded) | self.deactivated_peers()
        rtt = rtt_estimates(self.rtt, self.servers.keys())
        return choose(list(self.servers.values()), self.num_blocks, rtt, excluded, max_length, self.step_seconds)

    def disjoint_route(self, primary: list[RouteHop], max_length: int) -> list[RouteHop] | None:
        """A chain sharing no server with ``primary`` (banned servers excluded), or None."""
        return alternative_route(lambda excluded: self.find_route(excluded | self.banned, max_length), primary)

    def wait_for_coverage(self, timeout: float) -> list[RouteHop]:
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            try:
                return self.find_route(self.banned)
            except MissingBlocksError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def describe(self) -> dict:
        """Peer id -> (state, span, free cache tokens): what a log line says of the servers seen."""
        return {peer: (info.state.value, str(info.span), info.free_cache_tokens) for peer, info in self.servers.items()}
