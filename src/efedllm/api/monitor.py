"""The swarm monitor's data: a pure :func:`swarm_snapshot` of what the API's client knows, and the I/O around it.

Round trips and step times are what this process measured (:func:`probe_servers_periodically`
opens a session on each server's whole span and times one relayed decode step), never what a server
announces; its announced throughput is shown beside them, labelled as its claim. Verdicts come from
the DHT, signed by each verifier; a verdict from a verifier outside ``--trusted-verifiers`` is
shown but marked untrusted (it deactivates nothing). Balances come from a verifier's ledger file.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from efedllm.client.routing import RouteHop, compress_ranges
from efedllm.common.errors import RecordError
from efedllm.dht.identity import peer_id_of_owner
from efedllm.dht.records import ServerInfo, ServerState, TrustVerdict
from efedllm.verifier.ledger import Ledger, LedgerError

logger = logging.getLogger(__name__)
PROBE_TIMEOUT = 10.0


def block_hosts(num_blocks: int, servers: dict[str, ServerInfo], deactivated: set[str]) -> list[list[str]]:
    """Per block the sorted peer ids of the servers that can serve it: online and not deactivated by a
    verifier (what the monitor shows and what /health and /v1/models count as covered)."""
    usable = [info for info in servers.values() if info.state is ServerState.ONLINE and info.peer_id not in deactivated]
    return [sorted(info.peer_id for info in usable if info.span.start <= block < info.span.end) for block in range(num_blocks)]


def swarm_snapshot(model: str, num_blocks: int, servers: dict[str, ServerInfo], rtt: dict[str, float],
                   step_seconds: dict[str, float], deactivated: set[str], banned: set[str], verdicts: list[TrustVerdict],
                   trusted_keys: set[str], balances: dict[str, float] | None, stats) -> dict:
    """What ``GET /api/swarm`` answers: every server with its span, state and measurements, the blocks each
    serves and the gaps, verdicts, balances and the tokens/s this API serves now."""
    per_block = block_hosts(num_blocks, servers, deactivated)
    gaps = [block for block, peers in enumerate(per_block) if not peers]
    return {
        "model": model,
        "num_blocks": num_blocks,
        "blocks": per_block,
        "gaps": gaps,
        "gaps_text": compress_ranges(gaps),
        "servers": [_server_row(info, rtt, step_seconds, deactivated, banned, verdicts, trusted_keys, balances)
                    for info in sorted(servers.values(), key=lambda info: (info.span.start, info.peer_id))],
        "ledger": balances is not None,
        "serving": {"tokens_per_s": stats.tokens_per_s, "active_rows": stats.active_rows,
                    "opening_rows": stats.opening_rows, "waiting_requests": stats.waiting_jobs,
                    "tokens_total": stats.tokens_total},
    }


def _server_row(info: ServerInfo, rtt, step_seconds, deactivated, banned, verdicts, trusted_keys, balances) -> dict:
    per_block = step_seconds.get(info.peer_id)
    return {
        "peer_id": info.peer_id,
        "span": [info.span.start, info.span.end],
        "state": "deactivated" if info.peer_id in deactivated else info.state.value,
        "banned_here": info.peer_id in banned,
        "dtype": info.dtype,
        "rtt_ms": None if info.peer_id not in rtt else round(1000 * rtt[info.peer_id], 2),
        "step_ms": None if per_block is None else round(1000 * per_block * info.span.length, 2),
        "claimed_tokens_per_s": round(info.throughput, 2),
        "free_cache_tokens": info.free_cache_tokens,
        "verdicts": [_verdict_row(verdict, trusted_keys) for verdict in verdicts if verdict.server_peer_id == info.peer_id],
        "balance": None if balances is None else balances.get(info.peer_id, 0.0),
    }


def _verdict_row(verdict: TrustVerdict, trusted_keys: set[str]) -> dict:
    try:
        verifier = peer_id_of_owner(verdict.verifier_key)
    except RecordError:
        verifier = "?"
    return {"verifier": verifier, "trusted": verdict.verifier_key in trusted_keys, "score": round(verdict.score, 4),
            "active": verdict.active, "probes": verdict.probes, "passed": verdict.passed, "policy": verdict.policy,
            "timestamp": verdict.timestamp}


def read_balances(path: str | None) -> dict[str, float] | None:
    """Peer id -> balance from a verifier's ledger file (read only); None when no ledger is configured or readable."""
    if path is None or not Path(path).is_file():
        return None
    try:
        with Ledger(path).open(create=False) as ledger:
            return {balance.peer_id: round(balance.balance, 6) for balance in ledger.balances()}
    except LedgerError as error:
        logger.info("cannot read the ledger %s: %s", path, error)
        return None


async def probe_servers_periodically(model, interval: float) -> None:
    """Every ``interval`` s, measures each online server of the client's view (``model.probe``); runs until cancelled."""
    while True:
        servers = [info for info in model.view.servers.values() if info.state is ServerState.ONLINE]
        for info in servers:
            try:
                await asyncio.wait_for(model.probe(RouteHop(info.peer_id, info.span)), PROBE_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a server out of reach shows no fresh measurement; the next round retries
                logger.info("probe of %s failed: %r", info.peer_id, error)
        await asyncio.sleep(interval)
