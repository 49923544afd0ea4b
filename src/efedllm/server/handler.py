"""The P2P servicer: ``rpc_*`` handlers that open sessions, run steps and forward along the chain.

Call order for a session: ``rpc_open_session`` (on every hop), ``rpc_step`` (many times),
``rpc_close_session``. ``rpc_span_weights`` streams this server's weights to a joining server
(:mod:`efedllm.server.weights`). A step with ``next_hops`` is forwarded by this server straight to the
next hop and the chain's final answer comes back; no hop returns through the client. Every
request is validated; an error answers that request only and names what was wrong, or which
downstream peer failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator  # hivemind recognises streaming handlers by typing's alias only

from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from efedllm import wire
from efedllm.models.sessions import SpanInputError, SpanSessions
from efedllm.records import OpenSessionRequest, RecordError, StepRequest, WeightsRequest

logger = logging.getLogger(__name__)
FORWARD_TIMEOUT = 60.0


class DownstreamError(RuntimeError):
    def __init__(self, peer_id: str, message: str) -> None:
        self.peer_id = peer_id
        super().__init__(message)


class SpanServicer(ServicerBase):
    """Serves one span's sessions. ``compute`` runs blocking tensor work off the event loop."""

    def __init__(self, sessions: SpanSessions, p2p: P2P, compute, fault=None, wire_formats=wire.WIRE_FORMATS,
                 compression: dict | None = None) -> None:
        self.sessions, self.p2p, self.compute, self.fault = sessions, p2p, compute, fault
        self.wire_formats = tuple(wire_formats)
        self.compression = compression  # CompressionConfig.signature() of the hosted weights, None when dense
        self.last_used: dict[str, float] = {}
        self.steps_served = 0

    async def rpc_open_session(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            open_request = OpenSessionRequest.from_wire(wire.unpack_metadata(request.metadata))
            self.sessions.open(open_request.session_id, open_request.max_length, open_request.span)
        except (RecordError, SpanInputError) as error:
            return wire.error_response(str(error))
        self.last_used[open_request.session_id] = time.monotonic()
        return wire.response({"ok": True})

    async def rpc_close_session(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            session_id = wire.unpack_metadata(request.metadata).get("session_id")
            self.sessions.close(session_id if isinstance(session_id, str) else "")
        except (RecordError, SpanInputError) as error:
            return wire.error_response(str(error))
        self.last_used.pop(session_id, None)
        return wire.response({"ok": True})

    async def rpc_step(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            step = StepRequest.from_wire(wire.unpack_metadata(request.metadata))
            if step.wire_format not in self.wire_formats:
                raise RecordError(f"wire format {step.wire_format!r} is not accepted here: {list(self.wire_formats)}")
            session = self.sessions.get(step.session_id)
            if step.span != session.blocks:
                raise RecordError(f"step for blocks {step.span} sent to a session of blocks {session.blocks}")
            hidden = wire.decode_hidden(request.tensors, step.wire_format, self.sessions.model.dtype)
            delay = self.fault.delay_seconds() if self.fault is not None else 0.0
            if delay > 0:
                await asyncio.sleep(delay)
            outputs = await self.compute(self._run_step, step, hidden)
        except (RecordError, SpanInputError) as error:
            return wire.error_response(str(error))
        self.last_used[step.session_id] = time.monotonic()
        self.steps_served += 1
        tensors = wire.encode_hidden(outputs, step.wire_format)
        if not step.next_hops:
            return wire.response({"ok": True}, tensors)
        return await self._forward(step, tensors)

    async def rpc_span_weights(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        from efedllm.server.weights import pack_span_weights, weights_messages

        try:
            blocks = WeightsRequest.from_wire(wire.unpack_metadata(request.metadata)).span
            header, payload = await self.compute(pack_span_weights, self.sessions.model, blocks, self.compression)
        except RecordError as error:
            yield wire.error_response(str(error))
            return
        logger.info("sending blocks %s (%d bytes) to %s", blocks, header.payload_bytes, context.remote_id)
        for message in weights_messages(header, payload):
            yield message

    def _run_step(self, step: StepRequest, hidden):
        outputs = self.sessions.step(step.session_id, hidden, step.position)
        if self.fault is not None:
            outputs = self.fault.corrupt(hidden, outputs)
        return outputs

    async def _forward(self, step: StepRequest, tensors) -> runtime_pb2.ExpertResponse:
        next_hop, rest = step.next_hops[0], step.next_hops[1:]
        forwarded = StepRequest(next_hop.session_id, next_hop.span, step.position, step.wire_format, rest)
        try:
            stub = type(self).get_stub(self.p2p, PeerID.from_base58(next_hop.peer_id))
            return await asyncio.wait_for(stub.rpc_step(wire.request(forwarded.to_wire(), tensors)), FORWARD_TIMEOUT)
        except Exception as error:
            logger.info("forwarding to %s failed: %s", next_hop.peer_id, error)
            return wire.error_response(f"next hop {next_hop.peer_id} failed: {error!r}", failed_peer=next_hop.peer_id)

    def close_idle_sessions(self, idle_timeout: float) -> int:
        now, closed = time.monotonic(), 0
        for session_id, used in list(self.last_used.items()):
            if now - used > idle_timeout and session_id in self.sessions:
                self.sessions.close(session_id)
                self.last_used.pop(session_id, None)
                closed += 1
        return closed
