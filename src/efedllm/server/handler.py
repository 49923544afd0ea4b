"""The span service's implementation: ``rpc_*`` handlers that open sessions, run steps and forward along the chain.

The interface, handler names and stub are :mod:`efedllm.protocol.service`; ``start()`` registers this
implementation there and ``shutdown()`` removes it. Call order for a session: ``rpc_open_session``
(on every hop), ``rpc_step`` (many times), ``rpc_close_session``. ``rpc_span_weights`` streams this
server's weights to a joining server (:mod:`efedllm.server.weights`). A step with ``next_hops`` is
forwarded by this server straight to the next hop; no hop returns through the client. Every request
is validated; an error answers that request only and names what was wrong, or which downstream peer
failed.

A session belongs to the peer that opened it (:mod:`efedllm.server.admission`): only that peer may
close it, and only it or the ``upstream`` peer it named at open may step it; the open is admitted
against the server's KV-cache budget and per-peer limits, evicting idle sessions of the biggest
holder when full. A step whose chain comes back to this server is refused.

Chained steps with ``deliver_to`` (what clients send) come on the one-way ``STEP_PUSH`` stream
(:mod:`efedllm.protocol.channel`) and get no acknowledgement at all: each is computed at once and
pushed on to the next hop, and the last hop pushes the output to the requester's ``DELIVERY_PUSH``
(:mod:`efedllm.protocol.delivery`), so the answer does not travel back along the chain. A chained step is
four messages for three servers: client, hop, hop, hop, client. A step that cannot be served, and
one lost because the stream to the next hop broke, is reported to the requester by delivery,
naming the peer to blame. (Acknowledged steps measured slower: an acknowledgement sent before
computing delays the compute; one sent after, beside the hidden state, delays its transit by
~0.2 ms per hop.)

``rpc_step`` serves unary calls and the ``STEP_STREAM`` stream (relayed steps, answers along the
chain, verifiers' probes). A unary step with ``deliver_to`` is acknowledged at once, then computed
and handed on as above.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from efedllm.common.errors import RecordError
from efedllm.models.sessions import SpanInputError, SpanSessions, UnknownSessionError
from efedllm.protocol import codec
from efedllm.protocol.channel import ChannelPool
from efedllm.protocol.delivery import DELIVERY_PUSH, deliver
from efedllm.protocol.messages import (
    CloseSessionRequest,
    DeliveredStep,
    OpenSessionRequest,
    Reply,
    StepRequest,
    WeightsRequest,
)
from efedllm.protocol.service import STEP_PUSH, STEP_STREAM, serve_span_service, stop_span_service
from efedllm.server.admission import AccessError, AdmissionError, AdmissionPolicy, SessionLease, admit, check_access, free_tokens
from efedllm.server.faults import FaultMode
from efedllm.server.memory import release_freed_memory
from efedllm.server.weights import pack_span_weights, weights_messages

logger = logging.getLogger(__name__)
# Steps of at most this many rows × tokens run on the event loop: for a decode step the hand-off to
# the compute thread and back measured ~1.8 ms per hop, and the 3-server swarm went from 0.69 to 0.82
# of local tokens/s (benchmarks/swarm_vs_local.py). Longer steps (prefills, probes, batches) keep the
# loop free: a "decode" step of 4096 rows run inline stalled every other session for 5.5 s.
INLINE_STEP_TOKENS = 1
LARGE_CACHE_BYTES = 2**20  # closing a session that reserved this much also trims the C heap (server.memory)
FORWARD_TIMEOUT = 20.0  # below the client's default request timeout, so a stalled hop is reported first


class SpanServicer:
    """Serves one span's sessions. ``compute`` runs blocking tensor work off the event loop."""

    def __init__(self, sessions: SpanSessions, p2p: P2P, compute, policy: AdmissionPolicy, fault: FaultMode | None = None,
                 wire_formats=codec.WIRE_FORMATS, compression: dict | None = None) -> None:
        self.sessions, self.p2p, self.compute, self.policy, self.fault = sessions, p2p, compute, policy, fault
        self.peer_id = p2p.peer_id.to_base58()
        self.leases: dict[str, SessionLease] = {}  # session id -> its owner, upstream and reserved bytes
        self.wire_formats = tuple(wire_formats)
        self.compression = compression  # CompressionConfig.signature() of the hosted weights, None when dense
        self.last_used: dict[str, float] = {}
        self.steps_served = 0
        self._hand_ons: set[asyncio.Task] = set()  # forwards of delivered steps still in flight
        self.forwards = ChannelPool(p2p, STEP_STREAM)  # steps answered along the chain, to next hops
        self.pushes = ChannelPool(p2p, STEP_PUSH, unanswered_window=FORWARD_TIMEOUT)  # delivered steps, to next hops
        self.deliveries = ChannelPool(p2p, DELIVERY_PUSH)  # outputs and failure reports, to requesters
        self._pools = (self.forwards, self.pushes, self.deliveries)

    async def start(self) -> None:
        """Registers this servicer as the peer's span service (:func:`~efedllm.protocol.service.serve_span_service`)."""
        await serve_span_service(self.p2p, self)

    async def shutdown(self) -> None:
        """Unregisters the span service, stops the steps in flight and closes the open streams to other peers."""
        await stop_span_service(self.p2p)
        await self.cancel_hand_ons()

    async def rpc_open_session(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            self._open(codec.read_message(OpenSessionRequest, request), context.remote_id.to_base58())
        except (RecordError, SpanInputError, AdmissionError) as error:
            return codec.error_reply(str(error))
        return codec.ok_reply()

    def _open(self, request: OpenSessionRequest, owner: str) -> None:
        """Admits the session (evicting idle ones if the budget says so), opens it and records its lease."""
        if request.session_id in self.sessions:
            raise SpanInputError(f"session {request.session_id!r} is already open")
        if not 1 <= request.max_length <= self.sessions.max_length_limit:
            raise SpanInputError(f"max_length {request.max_length} must be between 1 and {self.sessions.max_length_limit}")
        if not self.sessions.model.span.contains(request.span):
            raise SpanInputError(f"blocks {request.span} are not inside this server's span {self.sessions.model.span}")
        reserved = request.batch * request.max_length * self.sessions.model.kv_bytes_per_token(request.span)
        now = time.monotonic()
        idle = {session_id: now - self.last_used.get(session_id, now) for session_id in self.leases}
        for session_id in admit(self.policy, self.leases, idle, owner, reserved, request.batch):
            logger.info("evicting idle session %s of %s for a session of %s", session_id, self.leases[session_id].owner, owner)
            self._drop(session_id)
        self.sessions.open(request.session_id, request.max_length, request.span, request.batch)
        self.leases[request.session_id] = SessionLease(owner, request.upstream, reserved, request.batch)
        self.last_used[request.session_id] = now

    def free_cache_tokens(self) -> int:
        """Batch-1 tokens of KV cache still free in the budget over the whole span: what the server announces."""
        return free_tokens(self.policy, self.leases, self.sessions.model.kv_bytes_per_token())

    def _drop(self, session_id: str) -> None:
        if session_id in self.sessions:
            self.sessions.close(session_id)
        lease = self.leases.pop(session_id, None)
        self.last_used.pop(session_id, None)
        if lease is not None and lease.reserved_bytes >= LARGE_CACHE_BYTES:
            release_freed_memory()

    async def rpc_close_session(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            session_id = codec.read_message(CloseSessionRequest, request).session_id
            check_access(self._lease(session_id), session_id, context.remote_id.to_base58(), closing=True)
        except (RecordError, SpanInputError, AccessError) as error:
            return codec.error_reply(str(error))
        self._drop(session_id)
        return codec.ok_reply()

    def _lease(self, session_id: str) -> SessionLease:
        lease = self.leases.get(session_id)
        if lease is None:
            raise UnknownSessionError(f"unknown session {session_id!r}")
        return lease

    async def rpc_step(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            step, hidden = self._read_step(request, context.remote_id.to_base58())
            if step.deliver_to is not None:
                self._start_hand_on(self._compute_and_hand_on(step, hidden))
                return codec.ok_reply()  # queued before the task computes: the caller is free at once
            tensors = await self._compute_step(step, hidden)
        except (RecordError, SpanInputError, AccessError) as error:
            return codec.error_reply(str(error))
        except Exception as error:  # a bug in one step must not end the stream that other sessions share
            logger.exception("a step failed")
            return codec.error_reply(f"{type(error).__name__}: {error}")
        if not step.next_hops:
            return codec.ok_reply(tensors)
        return await self._forward(step, tensors)

    async def on_pushed_step(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> None:
        """A delivered step from ``STEP_PUSH``: no acknowledgement, so every outcome goes to the requester."""
        try:
            step = codec.read_message(StepRequest, request)
        except RecordError as error:
            logger.info("unreadable one-way step from %s: %s", context.remote_id, error)
            return
        if step.deliver_to is None:
            logger.info("one-way step from %s names no requester to deliver to", context.remote_id)
            return
        try:
            hidden = self._step_inputs(step, request, context.remote_id.to_base58())
        except AccessError as error:  # not from the session's owner or upstream: nobody of its chain to tell
            logger.info("refused a one-way step: %s", error)
            return
        except (RecordError, SpanInputError) as error:
            await self._report(step, str(error), self.peer_id)
            return
        await self._compute_and_hand_on(step, hidden, acknowledged=False)

    def _read_step(self, request: runtime_pb2.ExpertRequest, sender: str):
        """(the validated StepRequest, its hidden states); raises RecordError, SpanInputError or AccessError."""
        step = codec.read_message(StepRequest, request)
        return step, self._step_inputs(step, request, sender)

    def _step_inputs(self, step: StepRequest, request: runtime_pb2.ExpertRequest, sender: str):
        """The step's hidden states, checked against this server's session, its lease and wire formats."""
        check_access(self._lease(step.session_id), step.session_id, sender)
        if any(hop.peer_id == self.peer_id for hop in step.next_hops):
            raise RecordError(f"step's next hops come back to this server {self.peer_id} (a loop)")
        if step.wire_format not in self.wire_formats:
            raise RecordError(f"wire format {step.wire_format!r} is not accepted here: {list(self.wire_formats)}")
        session = self.sessions.get(step.session_id)
        if step.span != session.blocks:
            raise RecordError(f"step for blocks {step.span} sent to a session of blocks {session.blocks}")
        hidden = codec.decode_hidden(request.tensors, step.wire_format, self.sessions.model.dtype)
        if hidden.dim() == 3 and hidden.shape[0] * hidden.shape[1] > self.policy.max_step_tokens:
            raise SpanInputError(f"step of {hidden.shape[0]} rows × {hidden.shape[1]} tokens exceeds this server's limit "
                                 f"of {self.policy.max_step_tokens} per step: send it in parts")
        return hidden

    async def rpc_span_weights(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            blocks = codec.read_message(WeightsRequest, request).span
            header, payload = await self.compute(pack_span_weights, self.sessions.model, blocks, self.compression)
        except RecordError as error:
            yield codec.error_reply(str(error))
            return
        logger.info("sending blocks %s (%d bytes) to %s", blocks, header.payload_bytes, context.remote_id)
        for message in weights_messages(header, payload):
            yield message

    async def _compute_step(self, step: StepRequest, hidden) -> list:
        """The step's output tensors, encoded for the wire."""
        delay = self.fault.delay_seconds() if self.fault is not None else 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        if hidden.shape[0] * hidden.shape[1] <= INLINE_STEP_TOKENS:
            outputs = self._run_step(step, hidden)  # a decode step: the thread hand-off costs more than it runs
        else:
            outputs = await self.compute(self._run_step, step, hidden)
        self.last_used[step.session_id] = time.monotonic()
        self.steps_served += 1
        return codec.encode_hidden(outputs, step.wire_format)

    def _run_step(self, step: StepRequest, hidden):
        outputs = self.sessions.step(step.session_id, hidden, step.position)
        if self.fault is not None:
            outputs = self.fault.corrupt(hidden, outputs)
        return outputs

    async def _forward(self, step: StepRequest, tensors) -> runtime_pb2.ExpertResponse:
        """Sends the step on; the answer, or an error response naming the hop that failed."""
        answer, error, failed_peer = await self._call_next_hop(step, tensors)
        return answer if answer is not None else codec.error_reply(error, failed_peer=failed_peer)

    async def _push_next_hop(self, step: StepRequest, tensors) -> None:
        """Sends a delivered step on, one way; if it is lost (the stream breaks first), the requester hears of it."""
        next_hop = step.next_hops[0]

        def lost(reason: str) -> None:
            self._start_hand_on(self._report(step, f"next hop {next_hop.peer_id} failed: {reason}", next_hop.peer_id))

        try:
            await self.pushes.send(next_hop.peer_id, codec.request(step.for_next_hop(), tensors), lost,
                                   key=next_hop.session_id, timeout=FORWARD_TIMEOUT)
        except Exception as error:
            logger.info("pushing to %s failed: %r", next_hop.peer_id, error)
            await self._report(step, f"next hop {next_hop.peer_id} failed: {error!r}", next_hop.peer_id)

    async def _call_next_hop(self, step: StepRequest, tensors) -> tuple[runtime_pb2.ExpertResponse | None, str, str]:
        """(the next hop's answer, "", "") when it accepted the step, else (None, error, peer to blame)."""
        next_hop = step.next_hops[0]
        try:
            answer = await self.forwards.call(next_hop.peer_id, codec.request(step.for_next_hop(), tensors), FORWARD_TIMEOUT)
            reply = codec.read_message(Reply, answer)
        except Exception as error:
            logger.info("forwarding to %s failed: %r", next_hop.peer_id, error)
            return None, f"next hop {next_hop.peer_id} failed: {error!r}", next_hop.peer_id
        if reply.ok:
            return answer, "", ""
        if reply.failed_peer:  # a hop further down failed and is named: pass the answer up as it is
            return answer, reply.error, reply.failed_peer
        return None, f"next hop {next_hop.peer_id}: {reply.error}", next_hop.peer_id

    def _start_hand_on(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._hand_ons.add(task)
        task.add_done_callback(self._hand_ons.discard)

    async def _compute_and_hand_on(self, step: StepRequest, hidden, acknowledged: bool = True) -> None:
        """A delivered step (after its acknowledgement, if it came as a call): compute, then push it on or,
        on the last hop, deliver the output; a failure is reported to the requester, naming the hop to blame."""
        for _ in range(2 if acknowledged else 0):
            await asyncio.sleep(0)  # let the acknowledgement be written first (hivemind queues it to a writer task)
        try:
            tensors = await self._compute_step(step, hidden)
        except Exception as error:  # the caller was answered already: the requester must hear of it
            if not isinstance(error, SpanInputError):
                logger.exception("step of session %s failed", step.session_id)
            await self._report(step, f"{type(error).__name__}: {error}", self.peer_id)
            return
        if step.next_hops:
            await self._push_next_hop(step, tensors)
            return
        try:
            await deliver(self.deliveries, step.deliver_to.peer_id, DeliveredStep(step.deliver_to.step_id), tensors)
        except Exception as error:
            logger.info("delivery to %s failed: %r", step.deliver_to.peer_id, error)

    async def _report(self, step: StepRequest, error: str, failed_peer: str) -> None:
        report = DeliveredStep(step.deliver_to.step_id, Reply.failure(error, failed_peer))
        try:
            await deliver(self.deliveries, step.deliver_to.peer_id, report)
        except Exception as delivery_error:
            logger.info("could not report a failed hop to %s: %r", step.deliver_to.peer_id, delivery_error)

    async def cancel_hand_ons(self) -> None:
        """At shutdown: stop the steps in flight and close the open streams to other peers."""
        for task in list(self._hand_ons):
            task.cancel()
        await asyncio.gather(*self._hand_ons, return_exceptions=True)
        for pool in self._pools:
            pool.close_all()

    def close_idle_sessions(self, idle_timeout: float) -> int:
        """Closes sessions (and open streams to other peers) unused for ``idle_timeout`` s; returns the sessions closed."""
        for pool in self._pools:
            pool.close_idle(idle_timeout)
        now, closed = time.monotonic(), 0
        for session_id, used in list(self.last_used.items()):
            if now - used > idle_timeout and session_id in self.sessions:
                self._drop(session_id)
                closed += 1
        return closed
