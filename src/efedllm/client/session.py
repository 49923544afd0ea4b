"""An inference session across a chain of servers, with failover by replay.

A step goes to the first hop with the rest of the chain attached, servers forward it hop to hop
and the last one delivers the output straight to the client (:mod:`efedllm.protocol.delivery`);
``relay=True`` instead sends every hop from the client, as Petals does. When a hop fails, the
session bans it for a while in the client's :class:`~efedllm.client.swarm_view.SwarmView`, picks a
new chain, opens sessions there and replays its past inputs, so generation continues with the same
tokens. A failure that one peer reports of another is not taken on trust (either may be lying): no
one is banned for it, and the next step is relayed hop by hop, where the client sees for itself
which hop fails. Each hop's session names the previous hop as the one peer besides this client
that may step it (:mod:`efedllm.server.admission`).

The session uses only the public parts of its :class:`SessionHost` (the distributed model):
``config``, ``view``, ``stub(peer)``, ``delivery``, ``peer_id``, ``wire_format``, ``dtype``,
``encode(hidden, wire_format)``, ``run(coroutine)``, ``loop`` and ``spot_checker``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Protocol

import torch

from efedllm.client.audit import SessionAudit, outputs_with_receipts
from efedllm.client.config import RemoteClientConfig
from efedllm.client.routing import MissingBlocksError, RouteHop
from efedllm.client.spot_check import SpotChecker
from efedllm.client.swarm_view import SwarmView
from efedllm.common.errors import RecordError
from efedllm.dht.identity import check_certificate
from efedllm.protocol import codec
from efedllm.protocol.delivery import DeliveryServicer
from efedllm.protocol.messages import Delivery, Hop, OpenSessionRequest, StepRequest
from efedllm.protocol.service import HopFailure, RemoteSpanStub

logger = logging.getLogger(__name__)


class SessionHost(Protocol):
    """What a session needs of the client that opened it."""

    config: RemoteClientConfig
    view: SwarmView
    delivery: DeliveryServicer
    peer_id: str
    wire_format: str
    dtype: torch.dtype
    spot_checker: SpotChecker
    bytes_received: int

    def stub(self, peer_id: str) -> RemoteSpanStub: ...

    def encode(self, hidden_states: torch.Tensor, wire_format: str) -> list: ...

    def run(self, coroutine): ...

    @property
    def loop(self): ...  # the BackgroundLoop that ``run`` uses (``loop.submit`` starts a coroutine without waiting)

    def draw_audit(self) -> bool: ...

    def submit_audit(self, audit: SessionAudit) -> None: ...


class RemoteInferenceSession:
    """A session across a chain of servers. Call order: ``open`` (or ``open_route``), ``step`` many times,
    ``finish`` (``close`` and, for an audited session, its audit; ``close`` alone on a failover)."""

    def __init__(self, host: SessionHost, max_length: int, audited: bool | None = None, batch: int = 1) -> None:
        self.host, self.max_length, self.batch = host, max_length, batch
        self.receipts = host.config.wants_receipts
        # drawn here, privately: servers see the same traffic from audited and other sessions
        self.audit = SessionAudit() if (host.draw_audit() if audited is None else audited) and self.receipts else None
        self.position = 0
        self.history: list[torch.Tensor] = []  # inputs of block 0, [batch, tokens, hidden] each
        self.route: list[RouteHop] = []
        self.session_ids: list[str] = []
        self.hops: list[Hop] = []  # the route's hops with their session ids, as steps name them
        self.failovers = 0
        self._relay_next_step = False  # after a failure no hop could be blamed for: find the culprit

    async def open(self, excluded: set[str]) -> None:
        spot_checks_on = self.host.config.verify_fraction > 0  # they need a second, disjoint chain
        await self.open_route(self.host.view.find_route(excluded, self.max_length, leave_disjoint=spot_checks_on))

    async def open_route(self, route: list[RouteHop]) -> None:
        """Open a session on every hop of ``route``; ``close()`` closes them, also after a failure here."""
        self.route = route
        self.session_ids = [uuid.uuid4().hex for _ in self.route]
        self.hops = [Hop(hop.peer_id, hop.blocks, session_id) for hop, session_id in zip(self.route, self.session_ids)]
        upstreams = [None] + [hop.peer_id for hop in self.route[:-1]]  # who forwards this client's steps to each hop
        await asyncio.gather(*(self._open_hop(hop, session_id, upstream)
                               for hop, session_id, upstream in zip(self.route, self.session_ids, upstreams)))
        for hop in self.route:
            self.host.view.served(hop.peer_id)

    async def _open_hop(self, hop: RouteHop, session_id: str, upstream: str | None) -> None:
        """Opens the session on one hop; its round trip updates the client's measured RTTs, which routing uses."""
        started = time.perf_counter()
        request = OpenSessionRequest(session_id, hop.blocks, self.max_length, upstream, self.batch)
        certificate = await self.host.stub(hop.peer_id).open_session(request)
        self.host.view.record_rtt(hop.peer_id, time.perf_counter() - started)
        if not self.receipts:
            return
        try:
            if certificate is None:
                raise RecordError("it sent no receipt certificate")
            check_certificate(certificate, hop.peer_id)
        except RecordError as error:
            raise HopFailure(hop.peer_id, f"server {hop.peer_id} cannot sign receipts: {error}") from None
        if self.audit is not None:
            self.audit.add_hop(Hop(hop.peer_id, hop.blocks, session_id), certificate)

    async def close(self) -> None:
        await asyncio.gather(*(self.host.stub(hop.peer_id).close_session(session_id)
                               for hop, session_id in zip(self.route, self.session_ids)), return_exceptions=True)

    async def finish(self) -> None:
        """Closes the session for good; an audited one goes to the verifiers (in the background)."""
        await self.close()
        if self.audit is not None:
            self.host.submit_audit(self.audit)
            self.audit = None

    def step(self, hidden_states: torch.Tensor, relay: bool = False) -> torch.Tensor:
        """Runs ``hidden_states`` [1, tokens, hidden] through the chain; ``relay`` sends this step hop by hop
        from the client (as ``RemoteClientConfig.relay`` does for every step)."""
        return self.host.run(self._step_with_failover(hidden_states, relay))

    async def step_async(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``step`` on the client's loop (what a batch of sessions awaits together)."""
        return await self._step_with_failover(hidden_states)

    async def _step_with_failover(self, hidden_states: torch.Tensor, relay: bool = False) -> torch.Tensor:
        config = self.host.config
        inputs, position = hidden_states, self.position
        for attempt in range(config.max_retries + 1):
            try:
                outputs = await self.forward(inputs, position, relay)
                break
            except HopFailure as failure:
                if attempt == config.max_retries:
                    raise
                logger.warning("hop failed (%s); finding another chain", failure)
                if failure.peer_id is None:
                    self._relay_next_step = True
                else:
                    self.host.view.ban(failure.peer_id)
                await asyncio.sleep(min(config.retry_delay * 2**attempt, config.max_retry_delay))
                await self.close()
                await self.reopen()
                self.failovers += 1
                inputs, position = torch.cat(self.history + [hidden_states], dim=1), 0  # replay the past
        outputs = outputs[:, -hidden_states.shape[1]:]
        if self.host.spot_checker.draw():
            await self.host.spot_checker.check(list(self.route), torch.cat(self.history + [hidden_states], dim=1), outputs)
        self.history.append(hidden_states)
        self.position += hidden_states.shape[1]
        return outputs

    async def reopen(self, view_max_age: float = 0.0) -> None:
        """Open on a new chain, reading the servers anew unless the client's view is ``view_max_age`` s old or less."""
        deadline = time.monotonic() + self.host.config.discovery_timeout
        while True:
            try:
                self.host.view.refresh(view_max_age)
                await self.open(self.host.view.banned)
                return
            except (MissingBlocksError, HopFailure) as error:
                if isinstance(error, HopFailure):
                    await self.close()  # the hops that did open: their sessions would hold cache until they expire
                    if error.peer_id is not None:
                        self.host.view.ban(error.peer_id)  # this client's own call to it failed: no one else's word
                if time.monotonic() > deadline:
                    raise
                view_max_age = 0.0
                await asyncio.sleep(0.5)

    async def forward(self, hidden_states: torch.Tensor, position: int, relay: bool = False) -> torch.Tensor:
        """``hidden_states`` [1, tokens, hidden] at ``position`` through the chain once (no failover); the outputs."""
        wire_format, hops = self.host.wire_format, self.hops
        if relay or self.host.config.relay or self._relay_next_step:
            self._relay_next_step = False
            for hop in hops:
                hidden_states = await self._call_hop(hop, (), hidden_states, position, wire_format)
            return hidden_states
        if len(hops) == 1 or not self.host.config.direct_delivery:
            return await self._call_hop(hops[0], tuple(hops[1:]), hidden_states, position, wire_format)
        return await self._call_chain(hops, hidden_states, position, wire_format)

    async def _call_chain(self, hops: list[Hop], hidden_states, position: int, wire_format: str):
        """The step through the whole chain; the last hop delivers the output to this client."""
        delivery, step_id, timeout = self.host.delivery, uuid.uuid4().hex, self.host.config.request_timeout
        delivery.expect(step_id, tuple(hop.peer_id for hop in hops))
        first = hops[0].peer_id
        try:
            step = StepRequest(hops[0].session_id, hops[0].span, position, wire_format, tuple(hops[1:]),
                               Delivery(self.host.peer_id, step_id), self.receipts)
            sent = self.host.encode(hidden_states, wire_format)
            await self.host.stub(first).push_step(step, sent, lambda reason: delivery.fail(step_id, first, reason), timeout)
            delivered, tensors = await delivery.wait(step_id, timeout)
        except asyncio.TimeoutError:
            raise HopFailure(None, f"no output from the chain within {timeout} s") from None
        finally:
            delivery.forget(step_id)
        if not delivered.reply.ok:
            raise HopFailure(delivered.reply.failed_peer, delivered.reply.error)
        tensors = self._checked_outputs(hops, position, sent, delivered.reply.receipts, tensors, wire_format)
        return self._decode_answer(tensors, hops[-1].peer_id, wire_format)

    def _checked_outputs(self, hops: list[Hop], position: int, sent: list, receipts, tensors: list, wire_format: str):
        """The last hop's output tensors, its receipts checked when asked for; a mismatch in a chain blames
        nobody (any hop after the culprit could have caused it) and the next step is relayed."""
        self.host.bytes_received += codec.wire_bytes(tensors)
        if not self.receipts:
            return tensors
        try:
            return outputs_with_receipts(hops, position, sent, receipts, tensors, wire_format, self.audit)
        except RecordError as error:
            raise HopFailure(hops[0].peer_id if len(hops) == 1 else None, f"receipts do not hold: {error}") from None

    async def _call_hop(self, hop: Hop, rest: tuple[Hop, ...], hidden_states, position: int, wire_format: str):
        request = StepRequest(hop.session_id, hop.span, position, wire_format, rest, receipts=self.receipts)
        started = time.perf_counter()
        sent = self.host.encode(hidden_states, wire_format)
        reply, tensors = await self.host.stub(hop.peer_id).step_answer(request, sent, self.host.config.request_timeout)
        tensors = self._checked_outputs([hop, *rest], position, sent, reply.receipts, tensors, wire_format)
        if not rest and hidden_states.shape[1] == 1:  # a decode step of this hop alone: what routing should expect of it
            view = self.host.view
            view.record_step_time(hop.peer_id, max(0.0, time.perf_counter() - started - view.rtt.get(hop.peer_id, 0.0)),
                                  hop.span.length)
        return self._decode_answer(tensors, hop.peer_id, wire_format)

    def _decode_answer(self, tensors, peer_id: str, wire_format: str) -> torch.Tensor:
        try:
            return codec.decode_hidden(tensors, wire_format, self.host.dtype)
        except RecordError as error:
            raise HopFailure(peer_id, f"bad answer from {peer_id}: {error}") from None
