"""Direct delivery of a chained step's output from the chain's last server to the peer that asked.

A peer that sends chained steps with ``StepRequest.deliver_to`` hosts a ``DeliveryServicer``.
Call order: ``start(p2p)`` once; per step ``expect(step_id, chain)`` before sending the step,
``await wait(step_id, timeout)`` for the answer, ``forget(step_id)`` when done (also after errors);
``shutdown()`` at the end. Servers call ``rpc_deliver`` through :func:`deliver`, as one-way messages on
an open stream (:mod:`efedllm.protocol.channel`, handle ``DELIVERY_PUSH``: an answer to a delivery would only
cost both peers a wake-up); a unary ``rpc_deliver`` is served too. ``fail(step_id, peer_id, reason)``
ends a wait with a failure the requester found itself (its stream to the first hop broke).

A delivery is validated strictly: it must name a step that is awaited, an output may only come
from the chain's last hop and an error report only from a hop of that chain. A report that blames
another peer than its sender names nobody (:meth:`~efedllm.protocol.messages.Reply.believed_from`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from efedllm.common.errors import RecordError
from efedllm.protocol import codec
from efedllm.protocol.channel import ChannelPool, serve_requests, stop_serving
from efedllm.protocol.messages import DeliveredStep, Reply

logger = logging.getLogger(__name__)
DELIVERY_TIMEOUT = 20.0
DELIVERY_PUSH = "DeliveryServicer.rpc_deliver.push"


@dataclass
class _Awaited:
    chain: tuple[str, ...]  # peer ids, in chain order
    future: asyncio.Future


class DeliveryServicer(ServicerBase):
    """Receives ``rpc_deliver`` calls for the steps this peer is waiting for."""

    def __init__(self) -> None:
        self._awaited: dict[str, _Awaited] = {}
        self._p2p: P2P | None = None

    async def start(self, p2p: P2P) -> None:
        self._p2p = p2p
        await self.add_p2p_handlers(p2p)
        await serve_requests(p2p, DELIVERY_PUSH, self._on_pushed_delivery, one_way=True)

    async def shutdown(self) -> None:
        for awaited in self._awaited.values():
            awaited.future.cancel()
        self._awaited.clear()
        if self._p2p is not None:
            await stop_serving(self._p2p, DELIVERY_PUSH)
            await self.remove_p2p_handlers(self._p2p)
            self._p2p = None

    def expect(self, step_id: str, chain: tuple[str, ...]) -> None:
        self._awaited[step_id] = _Awaited(tuple(chain), asyncio.get_running_loop().create_future())

    def forget(self, step_id: str) -> None:
        awaited = self._awaited.pop(step_id, None)
        if awaited is not None and not awaited.future.done():
            awaited.future.cancel()

    def fail(self, step_id: str, peer_id: str, reason: str) -> None:
        """Ends the wait for ``step_id`` (if any) with a failure that blames ``peer_id``."""
        awaited = self._awaited.get(step_id)
        if awaited is not None and not awaited.future.done():
            awaited.future.set_result((DeliveredStep(step_id, Reply.failure(reason, peer_id)), []))

    async def wait(self, step_id: str, timeout: float) -> tuple[DeliveredStep, list]:
        """The delivered metadata and tensors; ``asyncio.TimeoutError`` when nothing came in time."""
        async with asyncio.timeout(timeout):  # awaits the future itself: the fewest event-loop turns after it is set
            return await self._awaited[step_id].future

    async def rpc_deliver(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        error = await self._accept(request, context)
        return codec.ok_reply() if error is None else codec.error_reply(error)

    async def _on_pushed_delivery(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> None:
        error = await self._accept(request, context)
        if error is not None:  # e.g. a late report for a step already answered: nobody to tell
            logger.debug("dropped a delivery from %s: %s", context.remote_id, error)

    async def _accept(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> str | None:
        """Hands a valid delivery to the waiting step; returns why it was refused, or None."""
        try:
            delivered = codec.read_message(DeliveredStep, request)
            self._check_sender(delivered, context.remote_id.to_base58())
        except RecordError as error:
            return str(error)
        sender = context.remote_id.to_base58()
        if not delivered.reply.ok:
            delivered = DeliveredStep(delivered.step_id, delivered.reply.believed_from(sender))
        future = self._awaited[delivered.step_id].future
        if not future.done():
            future.set_result((delivered, list(request.tensors)))
            await asyncio.sleep(0)  # the waiting step goes on (the client's next token) before this handler answers or reads on
        return None

    def _check_sender(self, delivered: DeliveredStep, sender: str) -> None:
        awaited = self._awaited.get(delivered.step_id)
        if awaited is None:
            raise RecordError(f"step {delivered.step_id!r} is not awaited here (unknown or already answered)")
        if delivered.reply.ok and sender != awaited.chain[-1]:
            raise RecordError(f"output of step {delivered.step_id!r} from {sender}, not the chain's last hop")
        if not delivered.reply.ok and sender not in awaited.chain:
            raise RecordError(f"error report for step {delivered.step_id!r} from {sender}, not a hop of its chain")


async def deliver(channels: ChannelPool, peer_id: str, delivered: DeliveredStep, tensors=()) -> None:
    """Send ``delivered`` (and the output ``tensors``) one way to ``peer_id``'s ``DeliveryServicer`` over
    ``channels`` (a pool of streams to ``DELIVERY_PUSH``); raises ``ChannelError`` if it cannot be sent."""
    await channels.send(peer_id, codec.request(delivered, tensors), timeout=DELIVERY_TIMEOUT)
