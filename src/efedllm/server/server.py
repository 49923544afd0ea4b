"""A server's lifecycle: start (DHT, span, handlers, announce), serve, rebalance, shut down.

The constructor does no I/O. ``run()`` starts everything inside an asyncio loop, prints the
multiaddrs, and keeps announcing the server's record until ``stop()`` (SIGTERM / Ctrl-C), when it
announces itself offline and leaves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import signal
import time

import torch
from hivemind.utils import get_dht_time

from efedllm import __version__
from efedllm.common.receipts import ReceiptSigner
from efedllm.common.spans import Span
from efedllm.compression.calibration import compress_span
from efedllm.dht.records import ServerInfo, ServerState
from efedllm.dht.servers import announce, fetch_servers
from efedllm.dht.identity import Identity, certify_receipt_key, start_dht
from efedllm.dht.signed import owner_key
from efedllm.dht.verdicts import deactivated_peers_in_dht, fetch_verdicts
from efedllm.models.sessions import SpanSessions
from efedllm.models.quantization import quantize_module
from efedllm.models.span import SpanModel, load_span
from efedllm.models.weights import model_blocks
from efedllm.server.block_selection import block_coverage, choose_move, choose_window
from efedllm.server.config import ServerConfig
from efedllm.server.faults import FaultMode, RuledFault, parse_fault
from efedllm.server.handler import SpanServicer
from efedllm.server.metrics import NoMetrics, ServerMetrics
from efedllm.server.memory import loading_heap
from efedllm.server.weights import check_compression, fetch_span_weights, span_from_payload

logger = logging.getLogger(__name__)


def _set_compute_threads(threads: int) -> None:
    """The compute thread's torch threads: a per-thread OpenMP setting, made before the event loop's is set to 1."""
    torch.set_num_threads(threads)


def measure_throughput(sessions, repeats: int = 8) -> float:
    """Decode tokens per second through the whole span (one token, batch 1)."""
    model = sessions.model
    hidden = torch.randn(1, 1, model.hidden_size, dtype=model.dtype)
    cache = model.new_cache()
    with torch.inference_mode():
        model(hidden, position=0, cache=cache)
        started = time.perf_counter()
        for position in range(1, repeats + 1):
            model(hidden, position=position, cache=cache)
    return repeats / (time.perf_counter() - started)


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.dht = self.p2p = self.servicer = self.sessions = self.validator = self.signer = self.certificate = None
        self.peer_id: str | None = None
        self.maddrs: list[str] = []
        self.span: Span | None = None
        self.throughput = 0.0
        self.fault: FaultMode | None = None
        self.metrics = ServerMetrics() if config.metrics_port is not None else NoMetrics()
        self.metrics_port: int | None = None
        self._stopping: asyncio.Event | None = None
        # the one thread that computes (loads, passes, throughput): one OpenMP team (see server/batching.py)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="span-compute",
                                                               initializer=_set_compute_threads,
                                                               initargs=(config.torch_threads or torch.get_num_threads(),))

    # lifecycle -----------------------------------------------------------------------------
    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        try:
            await self.start()
            await self._serve_until_stopped()
        finally:
            await self.shutdown()  # also after a failed start: the DHT child process must not outlive us

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def start(self) -> None:
        torch.set_num_threads(1)  # torch work on the event loop (codecs, checks) runs serially: no second OpenMP team
        if self.config.metrics_port is not None:
            self.metrics.watch(self)
            self.metrics_port = self.metrics.start_http(self.config.host, self.config.metrics_port)
            print(f"efedllm server metrics at http://{self.config.host}:{self.metrics_port}/metrics", flush=True)
        path = self.config.identity_path
        identity = Identity.load_or_create(path) if path is not None else Identity.generate()
        self.validator = identity.validator  # records are signed by the key the peer id derives from
        self.signer = ReceiptSigner()  # a new receipt key each start, vouched for by the identity key
        self.certificate = certify_receipt_key(identity, self.signer.public_bytes, self.config.weight_format, time.time())
        self.dht = start_dht(identity, path, initial_peers=list(self.config.initial_peers) or None,
                             host_maddrs=self.config.host_maddrs, announce_maddrs=list(self.config.announce_maddrs) or None)
        self.p2p = await self.dht.replicate_p2p()
        self.peer_id = self.p2p.peer_id.to_base58()
        self.maddrs = [str(maddr) for maddr in self.dht.get_visible_maddrs()]
        span = self.config.blocks or await self._choose_span()
        await self._load(span)
        for maddr in self.maddrs:
            print(f"efedllm server {self.peer_id} serves blocks {self.span} at {maddr}", flush=True)

    def _write_ready_file(self) -> None:
        """Tells a launcher (``ready_file``) that this server is online: written whole, then renamed into place."""
        if self.config.ready_file is None:
            return
        ready = {"peer_id": self.peer_id, "blocks": str(self.span), "maddrs": self.maddrs, "metrics_port": self.metrics_port}
        staging = self.config.ready_file.with_name(f".{self.config.ready_file.name}.{os.getpid()}")
        staging.write_text(json.dumps(ready))
        os.replace(staging, self.config.ready_file)

    async def _load(self, span: Span) -> None:
        self.span = span
        self._announce(ServerState.JOINING)
        if self.config.weights_from and self.sessions is None:
            model = await self._receive_span_model(span)
        else:
            model = await self._compute(self._load_span_model, span)
        self.sessions = SpanSessions(model, self.config.max_sessions, self.config.max_session_length)
        self.throughput = await self._compute(measure_throughput, self.sessions)
        self.fault = fault = self._build_fault(model)
        if self.servicer is not None:
            await self.servicer.shutdown()
        compression = self.config.compression.signature() if self.config.compression else None
        policy = self.config.admission_policy(model.kv_bytes_per_token())
        self.servicer = SpanServicer(self.sessions, self.p2p, self._compute, policy, fault, self.config.wire_formats,
                                     compression, self.signer, self.certificate, self.config.batch_limits, self.metrics)
        await self.servicer.start()
        self._announce(ServerState.ONLINE)
        self._write_ready_file()

    def _load_span_model(self, span: Span) -> SpanModel:
        with loading_heap():  # server/memory.py: temporaries mapped on their own while loading, not while serving
            model = load_span(self.config.model, span.start, span.end, self.config.dtype, self.config.quant)
            if self.config.compression:
                compress_span(model, self.config.model, self.config.compression)
        return model

    async def _receive_span_model(self, span: Span) -> SpanModel:
        wanted = self.config.compression.signature() if self.config.compression else None
        header, payload = await fetch_span_weights(self.p2p, self.config.weights_from, span)
        still_to_compress = check_compression(header, wanted)
        model = await self._compute(_received_span, self.config.model, span, payload, self.config.dtype)
        print(f"efedllm server {self.peer_id} received blocks {span} from {self.config.weights_from}: "
              f"{header.payload_bytes} bytes on the wire, {header.dense_bytes} dense "
              f"(ratio {header.payload_bytes / header.dense_bytes:.4f})", flush=True)
        if still_to_compress:
            await self._compute(compress_span, model, self.config.model, self.config.compression)
        for layer in model.layers:
            quantize_module(layer, self.config.quant)
        return model

    def _build_fault(self, model: SpanModel) -> FaultMode | None:
        if not self.config.fault:
            return None
        fault = parse_fault(self.config.fault, seed=self.config.fault_seed)
        fault.prepare(model.layers)
        return fault

    async def _compute(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def shutdown(self) -> None:
        if self.dht is None:
            return
        try:
            if self.span is not None:
                self._announce(ServerState.OFFLINE)
        except Exception as error:
            logger.warning("could not announce offline: %s", error)
        if self.servicer is not None:
            try:
                await self.servicer.shutdown()
            except Exception as error:  # the p2p daemon may be gone already: the DHT must still shut down
                logger.warning("could not stop serving cleanly: %r", error)
        self.dht.shutdown()
        self.dht = None
        if isinstance(self.metrics, ServerMetrics):
            self.metrics.shutdown()
        self._executor.shutdown(wait=False)
        print(f"efedllm server {self.peer_id or '?'} left", flush=True)

    # serving -------------------------------------------------------------------------------
    async def _serve_until_stopped(self) -> None:
        next_rebalance = time.monotonic() + self.config.rebalance_interval
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.config.announce_interval)
            except asyncio.TimeoutError:
                pass
            if self._stopping.is_set():
                break
            self.servicer.close_idle_sessions(self.config.session_idle_timeout)
            await self._announce_periodically()
            await self._look_for_verdicts()
            if self.config.rebalance and self.config.num_blocks and time.monotonic() >= next_rebalance:
                next_rebalance = time.monotonic() + self.config.rebalance_interval
                await self._maybe_move()

    async def _announce_periodically(self) -> None:
        """Re-announce online, off the event loop (storing 10 signed records blocked serving for up to
        ~180 ms). A failed announce is logged and retried next period: it must not stop the server."""
        started = time.monotonic()
        try:
            missed = await asyncio.get_running_loop().run_in_executor(None, self._announce, ServerState.ONLINE)
        except Exception as error:
            logger.warning("announce failed after %.1f s: %r", time.monotonic() - started, error)
            return
        if missed:
            logger.warning("announce reached no DHT node for %d of the %d blocks", missed, self.span.length)

    async def _look_for_verdicts(self) -> None:
        """Only a fault with the ``verdict`` rule asks: has any verifier judged this server yet?"""
        if not (isinstance(self.fault, RuledFault) and self.fault.rules.verdict) or self.servicer.verdicts_seen:
            return
        verdicts = await asyncio.get_running_loop().run_in_executor(
            None, fetch_verdicts, self.dht, self.config.model, [self.peer_id])
        self.servicer.verdicts_seen = bool(verdicts)

    def info(self, state: ServerState) -> ServerInfo:
        free_tokens = 0
        if self.servicer is not None:
            free_tokens = self.servicer.free_cache_tokens()
        return ServerInfo(
            peer_id=self.peer_id,
            model=self.config.model,
            span=self.span,
            state=state,
            throughput=float(self.fault.announced_throughput(self.throughput) if self.fault else self.throughput),
            free_cache_tokens=free_tokens,
            max_sessions=self.config.max_sessions,
            public_key=owner_key(self.validator),
            software_version=__version__,
            issued_at=get_dht_time(),
            wire_formats=tuple(self.config.wire_formats),
            dtype=self.config.weight_format,
        )

    def _announce(self, state: ServerState) -> int:
        return announce(self.dht, self.validator, self.info(state), ttl=3 * self.config.announce_interval)

    # block selection -----------------------------------------------------------------------
    def _swarm_servers(self, excluded: set[str] = frozenset()):
        total = model_blocks(self.config.model)
        servers = fetch_servers(self.dht, self.config.model, total)
        banned = self.deactivated_peers(servers.keys()) | set(excluded)
        return [info for peer, info in servers.items() if peer not in banned], total

    def deactivated_peers(self, peer_ids) -> set[str]:
        """Those of ``peer_ids`` a quorum of trusted verifiers deactivated; their blocks count as uncovered."""
        return deactivated_peers_in_dht(self.dht, self.config.model, peer_ids, self.config.trusted_verifier_keys,
                                        self.config.verifier_quorum)

    async def _choose_span(self) -> Span:
        servers, total = await asyncio.get_running_loop().run_in_executor(None, self._swarm_servers)
        return choose_window(block_coverage(servers, total), self.config.num_blocks)

    async def _maybe_move(self) -> None:
        servers, total = await asyncio.get_running_loop().run_in_executor(None, self._swarm_servers, {self.peer_id})
        target = choose_move(block_coverage(servers, total), self.span)
        if target is not None and len(self.sessions) == 0:
            print(f"efedllm server {self.peer_id} moves from blocks {self.span} to {target}", flush=True)
            self._announce(ServerState.OFFLINE)
            await self._load(target)


def _received_span(model: str, span: Span, payload, dtype) -> SpanModel:
    with loading_heap():
        return span_from_payload(model, span, payload, dtype)
