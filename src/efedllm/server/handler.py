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
(:mod:`efedllm.protocol.channel`) and get no acknowledgement at all: each is computed as soon as the
span's :class:`~efedllm.server.batching.StepBatcher` runs it (the steps of concurrent sessions merge
into one forward pass over ragged KV caches; long prefills run in chunks between decode passes; peers
take turns) and pushed on to the next hop, and the last hop pushes the output to the requester's ``DELIVERY_PUSH``
(:mod:`efedllm.protocol.delivery`), so the answer does not travel back along the chain. A chained step is
four messages for three servers: client, hop, hop, hop, client. A step that cannot be served, and
one lost because the stream to the next hop broke, is reported to the requester by delivery,
naming the peer to blame. (Acknowledged steps measured slower: an acknowledgement sent before
computing delays the compute; one sent after, beside the hidden state, delays its transit by
~0.2 ms per hop.)

A step that asks for receipts (``StepRequest.receipts``) gets this server's signed
:class:`~efedllm.common.receipts.StepReceipt` of it, and every hop after the first receives the
outputs of the hops before it with their receipts: it checks, byte for byte, that what it was
handed is what those receipts commit to (else the step fails blaming the sender) and passes all of
them on with its own, so the requester gets every hop's output and receipt. Every step, receipts
asked for or not, extends the session's history digest that receipts carry. The open-session
reply carries the server's receipt certificate. Fault rules see each step's
:class:`~efedllm.server.faults.StepContext` (step index, shape, max_length, path, verdict seen).

``rpc_step`` serves unary calls and the ``STEP_STREAM`` stream (relayed steps, answers along the
chain, verifiers' probes). A unary step with ``deliver_to`` is acknowledged at once, then computed
and handed on as above.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from efedllm.common.errors import RecordError
from efedllm.common.receipts import ReceiptCertificate, ReceiptSigner, StepReceipt, extend_history, session_origin, tensor_digest
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
from efedllm.server.metrics import NoMetrics, rejection_reason
from efedllm.server.batching import BatchLimits, StepBatcher
from efedllm.server.faults import FaultMode, StepContext
from efedllm.server.memory import release_freed_memory
from efedllm.server.training import TrainingServicer
from efedllm.server.weights import pack_span_weights, weights_messages

logger = logging.getLogger(__name__)
LARGE_CACHE_BYTES = 2**20  # closing a session that reserved this much also trims the C heap (server.memory)
FORWARD_TIMEOUT = 20.0  # below the client's default request timeout, so a stalled hop is reported first


class UpstreamError(RecordError):
    """What the previous hop handed on does not match its own receipt: ``peer_id`` sent it."""

    def __init__(self, peer_id: str, message: str) -> None:
        self.peer_id = peer_id
        super().__init__(message)


@dataclass(frozen=True)
class StepInput:
    hidden: object  # torch.Tensor [rows, tokens, hidden]
    digest: bytes  # of its bytes as received (common.receipts.tensor_digest)
    carried: list  # the outputs of the hops before this one, as received, when receipts are asked for


@dataclass(frozen=True)
class StepOutcome:
    tensors: list  # what goes on: this hop's output, after the carried outputs when receipts are asked for
    receipts: tuple[StepReceipt, ...]  # the chain's receipts so far, this hop's last (empty when not asked for)


class SpanServicer:
    """Serves one span's sessions. ``compute`` runs blocking tensor work off the event loop.

    ``signer`` and ``certificate`` (:mod:`efedllm.common.receipts`) sign step receipts; without them
    a step that asks for receipts is refused."""

    def __init__(self, sessions: SpanSessions, p2p: P2P, compute, policy: AdmissionPolicy, fault: FaultMode | None = None,
                 wire_formats=codec.WIRE_FORMATS, compression: dict | None = None, signer: ReceiptSigner | None = None,
                 certificate: ReceiptCertificate | None = None, batch_limits: BatchLimits = BatchLimits(),
                 metrics: NoMetrics = NoMetrics()) -> None:
        self.sessions, self.p2p, self.compute, self.policy, self.fault = sessions, p2p, compute, policy, fault
        self.metrics = metrics  # steps computed and requests refused (server/metrics.py)
        self.batcher = StepBatcher(sessions, compute, batch_limits)  # steps of all sessions, merged into passes
        self.signer, self.certificate = signer, certificate
        self.peer_id = p2p.peer_id.to_base58()
        # training forwards and backwards (server/training.py)
        self.training = TrainingServicer(sessions, compute, fault=fault, signer=signer, certificate=certificate,
                                         peer_id=self.peer_id)
        self.leases: dict[str, SessionLease] = {}  # session id -> its owner, upstream and reserved bytes
        self.histories: dict[str, bytes] = {}  # session id -> its receipts' running history digest
        self.step_counts: dict[str, int] = {}  # session id -> steps served (what fault rules see)
        self.verdicts_seen = False  # a verifier has judged this server (set by the server; fault rules read it)
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
        await self.batcher.shutdown()

    async def rpc_open_session(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            self._open(codec.read_message(OpenSessionRequest, request), context.remote_id.to_base58())
        except (RecordError, SpanInputError, AdmissionError) as error:
            self.metrics.on_rejected(rejection_reason(error))
            return codec.error_reply(str(error))
        return codec.response(Reply(certificate=self.certificate)) if self.certificate else codec.ok_reply()

    def _open(self, request: OpenSessionRequest, owner: str) -> None:
        """Admits the session (evicting idle ones if the budget says so), opens it and records its lease."""
        self.sessions.check_open(request.session_id, request.max_length, request.span)
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
        for state in (self.last_used, self.histories, self.step_counts):
            state.pop(session_id, None)
        if lease is not None and lease.reserved_bytes >= LARGE_CACHE_BYTES:
            _trim_heap_soon()

    async def rpc_train(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self.training.handle(request, context.remote_id.to_base58())

    async def rpc_close_session(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            session_id = codec.read_message(CloseSessionRequest, request).session_id
            check_access(self._lease(session_id), session_id, context.remote_id.to_base58(), closing=True)
        except (RecordError, SpanInputError, AccessError) as error:
            self.metrics.on_rejected(rejection_reason(error))
            return codec.error_reply(str(error))
        self._drop(session_id)
        return codec.ok_reply()

    def _lease(self, session_id: str) -> SessionLease:
        lease = self.leases.get(session_id)
        if lease is None:
            raise UnknownSessionError(f"unknown session {session_id!r}")
        return lease

    async def rpc_step(self, request: runtime_pb2.ExpertRequest, context: P2PContext,
                       path: str = "unary") -> runtime_pb2.ExpertResponse:
        try:
            step, inputs = self._read_step(request, context.remote_id.to_base58())
            if step.deliver_to is not None:
                self._start_hand_on(self._compute_and_hand_on(step, inputs, path=path))
                return codec.ok_reply()  # queued before the task computes: the caller is free at once
            outcome = await self._compute_step(step, inputs, path)
        except UpstreamError as error:
            self.metrics.on_rejected("upstream")
            return codec.error_reply(str(error), failed_peer=error.peer_id)
        except (RecordError, SpanInputError, AccessError) as error:
            self.metrics.on_rejected(rejection_reason(error))
            return codec.error_reply(str(error))
        except Exception as error:  # a bug in one step must not end the stream that other sessions share
            self.metrics.on_rejected("internal")
            logger.exception("a step failed")
            return codec.error_reply(f"{type(error).__name__}: {error}")
        if not step.next_hops:
            return codec.response(Reply(receipts=outcome.receipts), outcome.tensors) if step.receipts \
                else codec.ok_reply(outcome.tensors)
        return await self._forward(step, outcome)

    async def on_streamed_step(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """``rpc_step`` for the ``STEP_STREAM`` stream."""
        return await self.rpc_step(request, context, path="stream")

    async def on_pushed_step(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> None:
        """A delivered step from ``STEP_PUSH``: no acknowledgement, so every outcome goes to the requester."""
        try:
            step = codec.read_message(StepRequest, request)
        except RecordError as error:
            self.metrics.on_rejected("invalid")
            logger.info("unreadable one-way step from %s: %s", context.remote_id, error)
            return
        if step.deliver_to is None:
            logger.info("one-way step from %s names no requester to deliver to", context.remote_id)
            return
        try:
            inputs = self._step_inputs(step, request, context.remote_id.to_base58())
        except AccessError as error:  # not from the session's owner or upstream: nobody of its chain to tell
            self.metrics.on_rejected("access")
            logger.info("refused a one-way step: %s", error)
            return
        except UpstreamError as error:  # the previous hop's word against its own receipt: it is to blame
            self.metrics.on_rejected("upstream")
            await self._report(step, str(error), error.peer_id)
            return
        except (RecordError, SpanInputError) as error:
            self.metrics.on_rejected(rejection_reason(error))
            await self._report(step, str(error), self.peer_id)
            return
        await self._compute_and_hand_on(step, inputs, acknowledged=False, path="push")

    def _read_step(self, request: runtime_pb2.ExpertRequest, sender: str) -> tuple[StepRequest, StepInput]:
        """(the validated StepRequest, its inputs); raises RecordError, SpanInputError or AccessError."""
        step = codec.read_message(StepRequest, request)
        return step, self._step_inputs(step, request, sender)

    def _step_inputs(self, step: StepRequest, request: runtime_pb2.ExpertRequest, sender: str) -> StepInput:
        """The step's hidden states, checked against this server's session, its lease and wire formats
        and, when receipts are asked for, against the upstream receipts."""
        check_access(self._lease(step.session_id), step.session_id, sender)
        if any(hop.peer_id == self.peer_id for hop in step.next_hops):
            raise RecordError(f"step's next hops come back to this server {self.peer_id} (a loop)")
        if step.wire_format not in self.wire_formats:
            raise RecordError(f"wire format {step.wire_format!r} is not accepted here: {list(self.wire_formats)}")
        session = self.sessions.get(step.session_id)
        if step.span != session.blocks:
            raise RecordError(f"step for blocks {step.span} sent to a session of blocks {session.blocks}")
        if step.receipts and self.signer is None:
            raise RecordError("this server signs no receipts")
        groups = codec.hidden_groups(request.tensors, step.wire_format) if step.receipts else [list(request.tensors)]
        carried = self._check_upstream(step, groups, sender) if step.receipts else []
        hidden = codec.decode_hidden(groups[-1], step.wire_format, self.sessions.model.dtype)
        self.sessions.validate_hidden(hidden)  # shape, dtype, NaN: before fault rules and receipts read its shape
        if hidden.shape[0] * hidden.shape[1] > self.policy.max_step_tokens:
            raise SpanInputError(f"step of {hidden.shape[0]} rows × {hidden.shape[1]} tokens exceeds this server's limit "
                                 f"of {self.policy.max_step_tokens} per step: send it in parts")
        # the input's digest: the previous hop's receipt names it (checked above), else it is hashed here
        digest = step.upstream_receipts[-1].output_digest if carried else tensor_digest(groups[-1])
        return StepInput(hidden, digest, carried)

    @staticmethod
    def _check_upstream(step: StepRequest, groups: list[list], sender: str) -> list:
        """The outputs of the hops before this one (all but the first hop get them, their input last),
        each checked byte for byte against its hop's receipt; UpstreamError blames the sender."""
        upstream = step.upstream_receipts
        if len(groups) != max(1, len(upstream)):
            raise RecordError(f"{len(groups)} hidden states with {len(upstream)} upstream receipts")
        if not upstream:
            return []
        if upstream[-1].peer_id != sender:
            raise UpstreamError(sender, f"the last upstream receipt is from {upstream[-1].peer_id}, not the sender {sender}")
        for index, (receipt, group) in enumerate(zip(upstream, groups)):
            if receipt.output_digest != tensor_digest(group) or receipt.position != step.position:
                raise UpstreamError(sender, f"output {index} handed on by {sender} is not what {receipt.peer_id}'s receipt "
                                            "commits to")
        return [tensor for group in groups for tensor in group]

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

    async def _compute_step(self, step: StepRequest, inputs: StepInput, path: str) -> StepOutcome:
        """The step's output tensors, encoded for the wire, and its receipt when asked for."""
        delay = self.fault.delay_seconds() if self.fault is not None else 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        hidden, context = inputs.hidden, self._fault_context(step, inputs.hidden, path)
        started = time.perf_counter()
        outputs = await self.batcher.run(step.session_id, self._lease(step.session_id).owner, hidden, step.position)
        self.metrics.on_step(hidden.shape[0], hidden.shape[1], time.perf_counter() - started)
        if self.fault is not None:
            outputs = self.fault.corrupt(hidden, outputs, context)
        self.last_used[step.session_id] = time.monotonic()
        self.steps_served += 1
        self.step_counts[step.session_id] = self.step_counts.get(step.session_id, 0) + 1
        history = extend_history(self.histories.get(step.session_id) or session_origin(step.session_id), step.position,
                                 inputs.digest)
        self.histories[step.session_id] = history  # every step counts, asked for receipts or not: no gap to hide in
        tensors = codec.encode_hidden(outputs, step.wire_format)
        if not step.receipts:
            return StepOutcome(tensors, ())
        receipt = self.signer.sign(StepReceipt(self.peer_id, step.session_id, step.span, step.position, hidden.shape[0],
                                               hidden.shape[1], step.wire_format, inputs.digest, tensor_digest(tensors),
                                               history))
        return StepOutcome(inputs.carried + tensors, step.upstream_receipts + (receipt,))

    def _fault_context(self, step: StepRequest, hidden, path: str) -> StepContext | None:
        if self.fault is None:
            return None
        return StepContext(self.step_counts.get(step.session_id, 0), step.position, hidden.shape[1], hidden.shape[0],
                           self.sessions.get(step.session_id).max_length, path, self.verdicts_seen)

    async def _forward(self, step: StepRequest, outcome: StepOutcome) -> runtime_pb2.ExpertResponse:
        """Sends the step on; the answer, or an error response naming the hop that failed."""
        answer, error, failed_peer = await self._call_next_hop(step, outcome)
        return answer if answer is not None else codec.error_reply(error, failed_peer=failed_peer)

    async def _push_next_hop(self, step: StepRequest, outcome: StepOutcome) -> None:
        """Sends a delivered step on, one way; if it is lost (the stream breaks first), the requester hears of it."""
        next_hop = step.next_hops[0]

        def lost(reason: str) -> None:
            self._start_hand_on(self._report(step, f"next hop {next_hop.peer_id} failed: {reason}", next_hop.peer_id))

        try:
            await self.pushes.send(next_hop.peer_id, codec.request(step.for_next_hop(outcome.receipts), outcome.tensors), lost,
                                   key=next_hop.session_id, timeout=FORWARD_TIMEOUT)
        except Exception as error:
            logger.info("pushing to %s failed: %r", next_hop.peer_id, error)
            await self._report(step, f"next hop {next_hop.peer_id} failed: {error!r}", next_hop.peer_id)

    async def _call_next_hop(self, step: StepRequest, outcome: StepOutcome) -> tuple[runtime_pb2.ExpertResponse | None, str, str]:
        """(the next hop's answer, "", "") when it accepted the step, else (None, error, peer to blame)."""
        next_hop = step.next_hops[0]
        request = codec.request(step.for_next_hop(outcome.receipts), outcome.tensors)
        try:
            answer = await self.forwards.call(next_hop.peer_id, request, FORWARD_TIMEOUT)
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

    async def _compute_and_hand_on(self, step: StepRequest, inputs: StepInput, acknowledged: bool = True,
                                   path: str = "unary") -> None:
        """A delivered step (after its acknowledgement, if it came as a call): compute, then push it on or,
        on the last hop, deliver the output; a failure is reported to the requester, naming the hop to blame."""
        for _ in range(2 if acknowledged else 0):
            await asyncio.sleep(0)  # let the acknowledgement be written first (hivemind queues it to a writer task)
        try:
            outcome = await self._compute_step(step, inputs, path)
        except Exception as error:  # the caller was answered already: the requester must hear of it
            if not isinstance(error, SpanInputError):
                logger.exception("step of session %s failed", step.session_id)
            await self._report(step, f"{type(error).__name__}: {error}", self.peer_id)
            return
        if step.next_hops:
            await self._push_next_hop(step, outcome)
            return
        try:
            delivered = DeliveredStep(step.deliver_to.step_id, Reply(receipts=outcome.receipts))
            await deliver(self.deliveries, step.deliver_to.peer_id, delivered, outcome.tensors)
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


def _trim_heap_soon() -> None:
    """Trims the C heap on a worker thread when called on an event loop (a trim walks the whole heap)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        release_freed_memory()
        return
    loop.run_in_executor(None, release_freed_memory)
