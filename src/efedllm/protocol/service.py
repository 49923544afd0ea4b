"""The span service: the handlers a server offers, how it registers them, and how peers call them.

:class:`SpanService` is the interface only. hivemind derives the handler names
(``SpanService.rpc_*``), their protobuf types and the stub from its annotated ``rpc_*`` methods;
a server registers its implementation (any object with these methods and ``on_pushed_step``)
with :func:`serve_span_service`, which also opens the two stream handlers:

- ``STEP_STREAM``: request/response ``rpc_step`` calls on an open stream (relayed steps, answers
  along the chain, verifiers' probes);
- ``STEP_PUSH``: one-way chained steps with a delivery (what clients send); their outcome reaches
  the requester by delivery (:mod:`efedllm.protocol.delivery`), never as an answer.

Clients and verifiers call a server through :class:`RemoteSpanStub`; a failed call raises
:class:`HopFailure` naming the peer to blame. Call order for a session: ``open_session`` on every
hop, ``step`` or ``push_step`` many times, ``close_session``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Callable  # hivemind recognises streaming handlers by typing's alias only

import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from efedllm.common.errors import EfedllmError, RecordError
from efedllm.protocol import codec
from efedllm.protocol.channel import ChannelPool, serve_requests, stop_serving
from efedllm.protocol.messages import CloseSessionRequest, OpenSessionRequest, Reply, StepRequest, TrainRequest

STEP_STREAM = "SpanService.rpc_step.stream"
STEP_PUSH = "SpanService.rpc_step.push"


class HopFailure(EfedllmError, RuntimeError):
    """A server of a chain failed a call; ``peer_id`` is the peer to blame (None: unknown, e.g. a timeout)."""

    def __init__(self, peer_id: str | None, message: str) -> None:
        self.peer_id = peer_id
        super().__init__(message)


class SpanService(ServicerBase):
    """The interface of a span server (see the module docstring); every method is implemented by the server."""

    async def rpc_open_session(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """An :class:`OpenSessionRequest`; answers a :class:`Reply`."""
        raise NotImplementedError

    async def rpc_close_session(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A :class:`CloseSessionRequest`; answers a :class:`Reply`."""
        raise NotImplementedError

    async def rpc_step(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A :class:`StepRequest` and its hidden states; answers a :class:`Reply` and the output hidden states."""
        raise NotImplementedError

    async def rpc_train(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A :class:`TrainRequest` and its tensors; answers a :class:`Reply` and the outputs or gradients."""
        raise NotImplementedError

    async def rpc_span_weights(self, request: runtime_pb2.ExpertRequest,
                               context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A :class:`WeightsRequest`; answers a :class:`Reply`, a :class:`WeightsHeader`, then payload chunks."""
        raise NotImplementedError
        yield  # an async generator, as hivemind expects of a streaming handler


async def serve_span_service(p2p: P2P, implementation) -> None:
    """Registers ``implementation`` as this peer's span service: the unary handlers and both step streams.

    ``implementation`` has :class:`SpanService`'s ``rpc_*`` methods, with the same signatures, and
    ``on_pushed_step(request, context)`` for ``STEP_PUSH`` (and may have ``on_streamed_step`` for ``STEP_STREAM``,
    else ``rpc_step`` serves it) (``efedllm.server.handler.SpanServicer``)."""
    await SpanService().add_p2p_handlers(p2p, wrapper=implementation)
    await serve_requests(p2p, STEP_STREAM, getattr(implementation, "on_streamed_step", implementation.rpc_step))
    await serve_requests(p2p, STEP_PUSH, implementation.on_pushed_step, one_way=True)


async def stop_span_service(p2p: P2P) -> None:
    await stop_serving(p2p, STEP_PUSH)
    await stop_serving(p2p, STEP_STREAM)
    await SpanService().remove_p2p_handlers(p2p)


def span_service_stub(p2p: P2P, peer_id: str):
    """hivemind's stub of ``peer_id``'s span service (``await stub.rpc_*(request)``), for raw calls."""
    return SpanService.get_stub(p2p, PeerID.from_base58(peer_id))


@dataclass(frozen=True)
class TrainExchange:
    """One training call: the server's reply, its decoded tensors, and the exact bytes sent and received."""

    reply: Reply
    tensors: list
    request_metadata: bytes
    request_tensors: list
    answer_tensors: list


class RemoteSpanStub:
    """Typed calls to one server's span service.

    With ``steps`` (a pool of open streams to ``STEP_STREAM``) ``step`` travels on an open stream,
    otherwise as a unary call; ``push_step`` sends a delivered step one way on ``pushes`` (streams
    to ``STEP_PUSH``). Every failure, of the transport or reported by the server, raises HopFailure.
    """

    def __init__(self, p2p: P2P, peer_id: str, steps: ChannelPool | None = None, pushes: ChannelPool | None = None) -> None:
        self.peer_id, self.steps, self.pushes = peer_id, steps, pushes
        self.stub = span_service_stub(p2p, peer_id)

    async def open_session(self, request: OpenSessionRequest, timeout: float = 30.0):
        """Opens the session; returns the server's receipt certificate (None if it sent none)."""
        reply, _ = await self._call("rpc_open_session", codec.request(request), timeout)
        return reply.certificate

    async def close_session(self, session_id: str, timeout: float = 5.0) -> None:
        await self._call("rpc_close_session", codec.request(CloseSessionRequest(session_id)), timeout)

    async def step(self, step: StepRequest, tensors, timeout: float = 30.0) -> list:
        """The step's answer (the output tensors of the chain from this hop on, unless it delivers them)."""
        return (await self.step_answer(step, tensors, timeout))[1]

    async def step_answer(self, step: StepRequest, tensors, timeout: float = 30.0) -> tuple[Reply, list]:
        """The step's :class:`Reply` (with its receipts, when asked for) and its output tensors."""
        reply, answer = await self._call("rpc_step", codec.request(step, tensors), timeout)
        return reply, list(answer.tensors)

    async def train(self, request: TrainRequest, tensors: list[torch.Tensor], timeout: float = 120.0) -> list[torch.Tensor]:
        """A training forward (the outputs) or backward (input gradients, then the tensors' gradients)."""
        return (await self.train_exchange(request, tensors, timeout)).tensors

    async def train_exchange(self, request: TrainRequest, tensors: list[torch.Tensor],
                             timeout: float = 120.0) -> "TrainExchange":
        """A training request and its answer, with the bytes of both (what a train receipt commits to)."""
        message = codec.request(request, codec.encode_tensors(tensors))
        reply, answer = await self._call("rpc_train", message, timeout)
        expected = len(request.names) + 1 if request.backward else 1
        try:
            decoded = codec.decode_tensors(answer.tensors, expected)
        except RecordError as error:
            raise HopFailure(self.peer_id, f"bad answer from {self.peer_id} to rpc_train: {error}") from None
        return TrainExchange(reply, decoded, message.metadata, list(message.tensors), list(answer.tensors))

    async def push_step(self, step: StepRequest, tensors, on_lost: Callable[[str], None], timeout: float) -> None:
        """Sends a delivered step without waiting for any answer; ``on_lost(reason)`` if the stream breaks first."""
        try:
            await self.pushes.send(self.peer_id, codec.request(step, tensors), on_lost, step.session_id, timeout)
        except Exception as error:
            raise HopFailure(self.peer_id, f"sending a step to {self.peer_id} failed: {error!r}") from None

    async def _call(self, method: str, request: runtime_pb2.ExpertRequest,
                    timeout: float) -> tuple[Reply, runtime_pb2.ExpertResponse]:
        try:
            if method == "rpc_step" and self.steps is not None:
                answer = await self.steps.call(self.peer_id, request, timeout)
            else:
                answer = await asyncio.wait_for(getattr(self.stub, method)(request), timeout)
            reply = codec.read_message(Reply, answer)
        except RecordError as error:
            raise HopFailure(self.peer_id, f"bad answer from {self.peer_id} to {method}: {error}") from None
        except Exception as error:
            raise HopFailure(self.peer_id, f"{method} on {self.peer_id} failed: {error!r}") from None
        if not reply.ok:
            believed = reply.believed_from(self.peer_id)
            raise HopFailure(believed.failed_peer, believed.error)
        return reply, answer
