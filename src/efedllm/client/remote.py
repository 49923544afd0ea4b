"""The distributed client: finds a chain of servers in the DHT and generates through it.

``DistributedModelForCausalLM`` owns the tokenizer, embeddings and LM head; each inference
session opens a session on every hop of a chain. A step goes to the first hop with the rest of
the chain attached, servers forward it hop to hop and the last one delivers the output straight
to the client (:mod:`efedllm.delivery`); ``relay=True`` instead sends every hop from the client,
as Petals does. When a hop fails, the client bans it, picks a new chain,
opens sessions there and replays the session's past inputs, so generation continues with the
same tokens.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from efedllm import wire
from efedllm.channel import ChannelPool
from efedllm.client.generation import CausalLMClient
from efedllm.client.routing import (
    MissingBlocksError,
    RouteHop,
    choose_checkable_route,
    choose_route,
    rtt_estimates,
    smoothed_rtt,
)
from efedllm.delivery import DeliveryServicer
from efedllm.records import Delivery, Hop, OpenSessionRequest, StepRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteClientConfig:
    """``relay`` routes every hop through the client; ``direct_delivery`` (chained steps only) makes
    the last hop send the output straight to the client, not back along the chain;
    ``wire_format`` defaults to the model dtype;
    ``max_retries`` bounds failover attempts per step, backing off from ``retry_delay`` up to ``max_retry_delay``;
    ``trusted_verifier_keys`` are the verifiers (hex keys) whose signed verdicts deactivate servers when
    ``verifier_quorum`` of them agree (no keys: no server is ever deactivated). ``verify_fraction``: the
share of steps also run through a disjoint second chain and compared (:mod:`efedllm.client.spot_check`).
``server_view_max_age``: a new session reuses the server records read from the DHT this many
seconds ago or less (reading them costs 50-75 ms here, 1.4% of a 64-token generation); a failover
always reads them anew. ``refresh_view_in_background``: re-read them every 0.8 x
``server_view_max_age`` s in the background (as Petals' client does every 60 s), so a new session
seldom waits for the DHT."""

    relay: bool = False
    direct_delivery: bool = True
    wire_format: str | None = None
    dtype: str = "float32"
    request_timeout: float = 30.0
    max_retries: int = 5
    retry_delay: float = 0.2
    max_retry_delay: float = 2.0
    discovery_timeout: float = 30.0
    trusted_verifier_keys: tuple[str, ...] = ()
    verifier_quorum: str = "majority"
    verify_fraction: float = 0.0
    spot_check_seed: int | None = None
    server_view_max_age: float = 10.0
    refresh_view_in_background: bool = True

    def __post_init__(self) -> None:
        from efedllm.verifier.quorum import QuorumRule

        if self.wire_format is not None:
            wire.check_wire_format(self.wire_format)
        object.__setattr__(self, "trusted_verifier_keys", tuple(self.trusted_verifier_keys))
        if not all(isinstance(key, str) and key for key in self.trusted_verifier_keys):
            raise ValueError("trusted_verifier_keys must be non-empty hex strings")
        if self.trusted_verifier_keys:
            QuorumRule.parse(self.verifier_quorum).required_votes(len(self.trusted_verifier_keys))
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ValueError(f"verify_fraction must be in [0, 1], got {self.verify_fraction}")
        if self.max_retries < 0 or self.request_timeout <= 0 or self.retry_delay < 0 or self.server_view_max_age < 0:
            raise ValueError("max_retries must be >= 0, request_timeout > 0, retry_delay and server_view_max_age >= 0")


class HopFailure(RuntimeError):
    def __init__(self, peer_id: str | None, message: str) -> None:
        self.peer_id = peer_id
        super().__init__(message)


class RemoteSpanStub:
    """Calls to one server's ``rpc_*`` handlers; with ``steps`` (a pool of open streams to
    ``STEP_STREAM``) ``rpc_step`` travels on an open stream, the other handlers as unary calls;
    ``push_step`` sends a delivered step one way on ``pushes`` (streams to ``STEP_PUSH``)."""

    def __init__(self, p2p, peer_id: str, steps: ChannelPool | None = None, pushes: ChannelPool | None = None) -> None:
        from hivemind.p2p import PeerID

        from efedllm.server.handler import SpanServicer

        self.peer_id, self.steps, self.pushes = peer_id, steps, pushes
        self.stub = SpanServicer.get_stub(p2p, PeerID.from_base58(peer_id))

    async def push_step(self, step: StepRequest, tensors, on_lost, timeout: float) -> None:
        """Sends a delivered step without waiting for any answer; ``on_lost(reason)`` if the stream breaks first."""
        try:
            await self.pushes.send(self.peer_id, wire.request(step.to_wire(), tensors), on_lost, step.session_id, timeout)
        except Exception as error:
            raise HopFailure(self.peer_id, f"sending a step to {self.peer_id} failed: {error!r}") from None

    async def call(self, method: str, metadata: dict, tensors=(), timeout: float = 30.0):
        request = wire.request(metadata, tensors)
        try:
            if method == "rpc_step" and self.steps is not None:
                answer = await self.steps.call(self.peer_id, request, timeout)
            else:
                answer = await asyncio.wait_for(getattr(self.stub, method)(request), timeout)
        except Exception as error:
            raise HopFailure(self.peer_id, f"{method} on {self.peer_id} failed: {error!r}") from None
        reply = wire.unpack_metadata(answer.metadata)
        if not reply.get("ok"):
            raise HopFailure(reply.get("failed_peer") or self.peer_id, str(reply.get("error")))
        return answer


class RemoteInferenceSession:
    """A session across a chain of servers, with failover by replay."""

    def __init__(self, model: "DistributedModelForCausalLM", max_length: int) -> None:
        self.model, self.max_length = model, max_length
        self.position = 0
        self.history: list[torch.Tensor] = []  # inputs of block 0, [1, tokens, hidden] each
        self.route: list[RouteHop] = []
        self.session_ids: list[str] = []
        self.failovers = 0
        self._relay_next_step = False  # after a failure no hop could be blamed for: find the culprit

    async def open(self, excluded: set[str]) -> None:
        spot_checks_on = self.model.config.verify_fraction > 0  # they need a second, disjoint chain
        await self.open_route(self.model.find_route(excluded, self.max_length, leave_disjoint=spot_checks_on))

    async def open_route(self, route: list[RouteHop]) -> None:
        """Open a session on every hop of ``route``; ``close()`` closes them, also after a failure here."""
        self.route = route
        self.session_ids = [uuid.uuid4().hex for _ in self.route]
        await asyncio.gather(*(self._open_hop(hop, session_id) for hop, session_id in zip(self.route, self.session_ids)))

    async def _open_hop(self, hop: RouteHop, session_id: str) -> None:
        """Opens the session on one hop; its round trip updates the client's measured RTTs, which routing uses."""
        started = time.perf_counter()
        request = OpenSessionRequest(session_id, hop.blocks, self.max_length).to_wire()
        await self.model.stub(hop.peer_id).call("rpc_open_session", request)
        self.model.rtt[hop.peer_id] = smoothed_rtt(self.model.rtt.get(hop.peer_id), time.perf_counter() - started)

    async def close(self) -> None:
        await asyncio.gather(*(
            self.model.stub(hop.peer_id).call("rpc_close_session", {"session_id": session_id}, timeout=5.0)
            for hop, session_id in zip(self.route, self.session_ids)
        ), return_exceptions=True)

    def step(self, hidden_states: torch.Tensor, relay: bool = False) -> torch.Tensor:
        """Runs ``hidden_states`` [1, tokens, hidden] through the chain; ``relay`` sends this step hop by hop
        from the client (as ``RemoteClientConfig.relay`` does for every step)."""
        return self.model.run(self._step_with_failover(hidden_states, relay))

    async def _step_with_failover(self, hidden_states: torch.Tensor, relay: bool = False) -> torch.Tensor:
        config = self.model.config
        inputs, position = hidden_states, self.position
        for attempt in range(config.max_retries + 1):
            try:
                outputs = await self._send(inputs, position, relay)
                break
            except HopFailure as failure:
                if attempt == config.max_retries:
                    raise
                logger.warning("hop failed (%s); finding another chain", failure)
                if failure.peer_id is None:
                    self._relay_next_step = True
                else:
                    self.model.banned.add(failure.peer_id)
                await asyncio.sleep(min(config.retry_delay * 2**attempt, config.max_retry_delay))
                await self.close()
                await self._reopen()
                self.failovers += 1
                inputs, position = torch.cat(self.history + [hidden_states], dim=1), 0  # replay the past
        outputs = outputs[:, -hidden_states.shape[1]:]
        if self.model.draw_spot_check():
            from efedllm.client.spot_check import run_spot_check

            await run_spot_check(self.model, list(self.route), torch.cat(self.history + [hidden_states], dim=1), outputs)
        self.history.append(hidden_states)
        self.position += hidden_states.shape[1]
        return outputs

    async def _reopen(self, view_max_age: float = 0.0) -> None:
        """Open on a new chain, reading the servers anew unless the client's view is ``view_max_age`` s old or less."""
        deadline = time.monotonic() + self.model.config.discovery_timeout
        while True:
            try:
                self.model.refresh_servers(view_max_age)
                await self.open(self.model.banned)
                return
            except (MissingBlocksError, HopFailure):
                if time.monotonic() > deadline:
                    raise
                view_max_age = 0.0
                await asyncio.sleep(0.5)

    async def _send(self, hidden_states: torch.Tensor, position: int, relay: bool = False) -> torch.Tensor:
        wire_format = self.model.wire_format
        hops = [Hop(hop.peer_id, hop.blocks, session_id) for hop, session_id in zip(self.route, self.session_ids)]
        if relay or self.model.config.relay or self._relay_next_step:
            self._relay_next_step = False
            for hop in hops:
                hidden_states = await self._call_hop(hop, (), hidden_states, position, wire_format)
            return hidden_states
        if len(hops) == 1 or not self.model.config.direct_delivery:
            return await self._call_hop(hops[0], tuple(hops[1:]), hidden_states, position, wire_format)
        return await self._call_chain(hops, hidden_states, position, wire_format)

    async def _call_chain(self, hops: list[Hop], hidden_states, position: int, wire_format: str):
        """The step through the whole chain; the last hop delivers the output to this client."""
        delivery, step_id = self.model.delivery, uuid.uuid4().hex
        delivery.expect(step_id, tuple(hop.peer_id for hop in hops))
        first = hops[0].peer_id
        try:
            step = StepRequest(hops[0].session_id, hops[0].span, position, wire_format, tuple(hops[1:]),
                               Delivery(self.model.peer_id, step_id))
            await self.model.stub(first).push_step(step, self._encode(hidden_states, wire_format),
                                                   lambda reason: delivery.fail(step_id, first, reason),
                                                   self.model.config.request_timeout)
            delivered, tensors = await delivery.wait(step_id, self.model.config.request_timeout)
        except asyncio.TimeoutError:
            raise HopFailure(None, f"no output from the chain within {self.model.config.request_timeout} s") from None
        finally:
            delivery.forget(step_id)
        if delivered.error is not None:
            raise HopFailure(delivered.failed_peer, delivered.error)
        return self._decode_answer(tensors, hops[-1].peer_id, wire_format)

    async def _call_hop(self, hop: Hop, rest: tuple[Hop, ...], hidden_states, position: int, wire_format: str):
        answer = await self._send_step(hop, rest, hidden_states, position, wire_format)
        return self._decode_answer(answer.tensors, hop.peer_id, wire_format)

    async def _send_step(self, hop: Hop, rest: tuple[Hop, ...], hidden_states, position: int, wire_format: str):
        request = StepRequest(hop.session_id, hop.span, position, wire_format, rest)
        return await self.model.stub(hop.peer_id).call("rpc_step", request.to_wire(), self._encode(hidden_states, wire_format),
                                                       self.model.config.request_timeout)

    def _encode(self, hidden_states: torch.Tensor, wire_format: str) -> list:
        """The hidden states as sent, counted in the client's ``bytes_sent``."""
        tensors = wire.encode_hidden(hidden_states, wire_format)
        self.model.bytes_sent += wire.wire_bytes(tensors)
        return tensors

    def _decode_answer(self, tensors, peer_id: str, wire_format: str) -> torch.Tensor:
        try:
            return wire.decode_hidden(tensors, wire_format, self.model.parts.dtype)
        except ValueError as error:
            raise HopFailure(peer_id, f"bad answer from {peer_id}: {error}") from None


async def _close_streams(*pools: ChannelPool) -> None:
    for pool in pools:
        pool.close_all()  # on the event loop: it closes stream writers and cancels their readers


async def _cancel_other_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class DistributedModelForCausalLM(CausalLMClient):
    """A causal LM whose blocks run on a swarm; local parts are tokenizer, embeddings and LM head."""

    def __init__(self, model: str, initial_peers: list[str], config: RemoteClientConfig = RemoteClientConfig()) -> None:
        self.model_name, self.initial_peers, self.config = model, list(initial_peers), config
        self.parts = None
        self.servers: dict = {}
        self.banned: set[str] = set()
        self.rtt: dict[str, float] = {}
        self.bytes_sent = 0
        self._deactivated: set[str] = set()
        self._view_read_at: float | None = None  # time.monotonic() of the last refresh_servers() read
        self._view_lock = threading.Lock()  # the background refresh and a session's own read take turns
        self._stubs: dict[str, RemoteSpanStub] = {}
        self.spot_checks = self.spot_checks_skipped = 0
        self.spot_check_evidence: list = []  # SpotCheckEvidence this client reported

    @classmethod
    def from_pretrained(cls, model: str, initial_peers: list[str], config: RemoteClientConfig = RemoteClientConfig()):
        instance = cls(model, initial_peers, config)
        instance.start()
        return instance

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        from hivemind.dht import DHT
        from hivemind.dht.crypto import RSASignatureValidator

        from efedllm.models.span import load_client_parts

        self.parts = load_client_parts(self.model_name, self.config.dtype)
        self.wire_format = self.config.wire_format or self.config.dtype
        import random

        from efedllm.verifier.verdicts import verifier_key

        self.validator = RSASignatureValidator()
        self.client_key = verifier_key(self.validator)
        self._spot_check_random = random.Random(self.config.spot_check_seed)
        self.dht = DHT(initial_peers=self.initial_peers, start=True, client_mode=True,
                       record_validators=[self.validator])
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="efedllm-client-loop")
        self._thread.start()
        self.p2p = self.run(self.dht.replicate_p2p())
        self.peer_id = self.p2p.peer_id.to_base58()
        self.delivery = DeliveryServicer()
        self.run(self.delivery.start(self.p2p))
        from efedllm.server.handler import STEP_PUSH, STEP_STREAM

        self.steps, self.pushes = ChannelPool(self.p2p, STEP_STREAM), ChannelPool(self.p2p, STEP_PUSH)
        self.wait_for_coverage(self.config.discovery_timeout)
        if self.config.refresh_view_in_background and self.config.server_view_max_age > 0:
            asyncio.run_coroutine_threadsafe(self._refresh_view_periodically(0.8 * self.config.server_view_max_age), self._loop)

    def shutdown(self) -> None:
        if getattr(self, "_loop", None) is not None:
            if getattr(self, "delivery", None) is not None:
                self.run(self.delivery.shutdown())
            if getattr(self, "steps", None) is not None:
                self.run(_close_streams(self.steps, self.pushes))
            self.run(_cancel_other_tasks())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
            self._loop = None
        if getattr(self, "dht", None) is not None:
            self.dht.shutdown()
            self.dht = None

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # discovery and routing -----------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.parts.config.num_hidden_layers

    def refresh_servers(self, max_age: float = 0.0) -> None:
        """Read the server records and verdicts from the DHT, unless the last read is at most ``max_age`` s old."""
        from efedllm.discovery import fetch_servers

        with self._view_lock:
            if self._view_read_at is not None and time.monotonic() - self._view_read_at <= max_age:
                return
            read_at = time.monotonic()
            self.servers = fetch_servers(self.dht, self.model_name, self.num_blocks)
            self._deactivated = self._fetch_deactivated()
            self._view_read_at = read_at

    async def _refresh_view_periodically(self, interval: float) -> None:
        """Keeps the view younger than ``server_view_max_age`` between sessions (cancelled at shutdown)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            try:
                await loop.run_in_executor(None, self.refresh_servers, interval / 2)
            except Exception as error:  # the DHT may be unreachable for a while: the next period retries
                logger.info("background refresh of the server view failed: %r", error)

    def _fetch_deactivated(self) -> set[str]:
        from efedllm.verifier.quorum import QuorumRule
        from efedllm.verifier.verdicts import deactivated_peers_in_dht

        keys = self.config.trusted_verifier_keys
        if not keys or not self.servers:
            return set()
        return deactivated_peers_in_dht(self.dht, self.model_name, self.servers.keys(), keys,
                                        QuorumRule.parse(self.config.verifier_quorum))

    def deactivated_peers(self) -> set[str]:
        """Peers a quorum of trusted verifiers deactivated, as of the last ``refresh_servers()``."""
        return set(self._deactivated)

    def find_route(self, excluded: set[str], max_length: int = 0, leave_disjoint: bool = False) -> list[RouteHop]:
        """The cheapest chain; with ``leave_disjoint``, the cheapest that leaves a disjoint second chain."""
        choose = choose_checkable_route if leave_disjoint else choose_route
        excluded = set(excluded) | self.deactivated_peers()
        rtt = rtt_estimates(self.rtt, self.servers.keys())
        return choose(list(self.servers.values()), self.num_blocks, rtt, excluded, max_length)

    def wait_for_coverage(self, timeout: float) -> list[RouteHop]:
        deadline = time.monotonic() + timeout
        while True:
            self.refresh_servers()
            try:
                return self.find_route(self.banned)
            except MissingBlocksError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def draw_spot_check(self) -> bool:
        from efedllm.client.spot_check import draw_spot_check

        return draw_spot_check(self._spot_check_random, self.config.verify_fraction)

    def report_evidence(self, evidence) -> bool:
        """Publish spot-check evidence (signed with this client's key) for the verifiers."""
        from efedllm.verifier.evidence import publish_evidence

        try:
            return publish_evidence(self.dht, self.validator, self.model_name, evidence)
        except Exception as error:
            logger.warning("could not publish spot-check evidence: %s", error)
            return False

    def stub(self, peer_id: str) -> RemoteSpanStub:
        if peer_id not in self._stubs:
            self._stubs[peer_id] = RemoteSpanStub(self.p2p, peer_id, self.steps, self.pushes)
        return self._stubs[peer_id]

    # sessions ------------------------------------------------------------------------------
    @contextmanager
    def inference_session(self, max_length: int):
        session = RemoteInferenceSession(self, max_length)
        self.run(session._reopen(self.config.server_view_max_age))
        try:
            yield session
        finally:
            self.run(session.close())
