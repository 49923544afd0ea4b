"""Open streams that carry request/response pairs between two peers: the path every inference step takes.

A unary hivemind call opens a new libp2p stream per request. Between two processes on 127.0.0.1 that
sit idle 60 ms between messages, as a chain's servers do between decode steps, one way took 1.13 ms
as a unary call and 0.60 ms as a message on an open stream (0.60 vs 0.31 ms with 5 ms gaps;
``benchmarks/hop_latency.py``); a 3-server chained step sends 4 such messages. So a peer keeps one open stream per remote peer and
sends each step's request on it.

Both ends speak hivemind's stream framing (a marker byte, an 8-byte length, a protobuf):
``ExpertRequest`` frames one way and exactly one ``ExpertResponse`` per request back, in request
order. A stream's requests are handled concurrently, up to ``MAX_IN_FLIGHT`` at once, and answered in
request order: one client's sessions share a stream to each server, and their steps must reach the
server's batcher together to be merged into one pass (:mod:`efedllm.server.batching`); handled one at a
time, 32 sessions ran one row per pass.

Server side: ``serve_requests(p2p, name, handler)`` registers a hivemind binary stream handler that
calls ``handler(request, context)`` (the same signature as a unary ``rpc_*`` handler) for each request;
``stop_serving(p2p, name)`` removes it. A frame longer than ``max_message_bytes`` or one that does not
parse gets an error response naming the problem; an oversized frame also ends that stream (the
framing cannot be resynchronised), and other streams are unaffected.

Client side: ``ChannelPool(p2p, name)``; ``await pool.call(peer_id, request, timeout)`` opens the stream on
first use and returns the response; ``close_idle(max_idle)`` and ``close_all()`` end streams. A stream that
breaks or times out fails every request waiting on it with ``ChannelError`` and is replaced on next use.

One-way streams (``serve_requests(..., one_way=True)`` and ``pool.send``) carry messages that get no
answer, and the messages sent to one peer in one event-loop turn travel as one bundle frame (the steps
of a merged pass, all for the next hop, or a batch's rows from a client): on 127.0.0.1 every frame
costs both ends and both p2p daemons a wake-up, and 32 rows sent apart reached the first server spread
over several passes. A chained step needs no answer, since its outcome reaches the requester by
delivery, and each acknowledgement cost every hop a wake-up. ``send(peer_id, request, on_broken, key)`` arms
``on_broken(reason)`` until the next message with the same ``key`` (a session: its steps go one at
a time) or ``unanswered_window`` s; if the stream breaks meanwhile (the peer went away), it is
called, so the sender can report the message as lost. ``send`` raises ``ChannelError`` only when the
stream is already closed; a write that fails at the end of the turn closes it and calls the armed
``on_broken``s. A server answers a one-way stream only with
an error frame, just before it closes it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from contextlib import closing
from typing import Awaitable, Callable

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from efedllm.common.errors import EfedllmError
from efedllm.protocol import codec

logger = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 64 * 1024**2  # a float32 prefill of 8192 tokens at hidden size 2048; unary calls stop at 4 MiB
BUNDLE_UID = "efedllm.bundle.v1"  # an ExpertRequest with this uid carries several one-way messages
MAX_BUNDLE_BYTES = 8 * 2**20  # a bundle goes out once its messages reach this size
MAX_BUNDLE_MESSAGES = 1024
MAX_BUNDLE_INDEX_BYTES = 1024**2  # its index (each message's uid and metadata); a bundle goes out before it grows past
MAX_IN_FLIGHT = 256  # requests of one stream being handled at once; the reader waits beyond it (backpressure)
Handler = Callable[[runtime_pb2.ExpertRequest, P2PContext], Awaitable[runtime_pb2.ExpertResponse]]


class ChannelError(EfedllmError, ConnectionError):
    """The stream to a peer could not be opened, broke, answered out of protocol or timed out."""


class FrameError(EfedllmError, ValueError):
    """A frame that is oversized (``fatal``: the stream cannot go on) or does not parse."""

    def __init__(self, message: str, fatal: bool) -> None:
        self.fatal = fatal
        super().__init__(message)


async def read_frame(reader: asyncio.StreamReader, message_type, max_bytes: int):
    """The next protobuf of ``message_type``; None for hivemind's end-of-stream marker."""
    marker = await reader.readexactly(1)
    length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    if length > max_bytes:
        raise FrameError(f"message of {length} bytes exceeds the limit of {max_bytes}", fatal=True)
    data = await reader.readexactly(length)
    if marker == P2P.ERROR_MARKER:
        return None
    if marker != P2P.MESSAGE_MARKER:
        raise FrameError(f"unknown frame marker {marker!r}", fatal=True)
    try:
        return message_type.FromString(data)
    except Exception as error:  # protobuf raises DecodeError, and sometimes others, on garbage
        raise FrameError(f"message is not a valid {message_type.__name__}: {error}", fatal=False) from None


# server side ---------------------------------------------------------------------------------
async def serve_requests(p2p: P2P, name: str, handler: Handler, max_message_bytes: int = MAX_MESSAGE_BYTES,
                         one_way: bool = False) -> None:
    """Serve ``name``; with ``one_way`` the handler's return value is dropped and nothing is answered."""
    async def handle_stream(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=stream_info.peer_id)
        with closing(writer):
            try:
                await _answer_requests(context, reader, writer, handler, max_message_bytes, one_way)
            except asyncio.CancelledError:
                pass  # shutdown: asyncio's stream callback (3.11) would log a cancelled connection task as an error

    await p2p.add_binary_stream_handler(name, handle_stream)


async def stop_serving(p2p: P2P, name: str) -> None:
    await p2p.remove_binary_stream_handler(name)


async def _answer_requests(context: P2PContext, reader, writer, handler: Handler, max_bytes: int, one_way: bool) -> None:
    """Reads requests and handles them concurrently (up to ``MAX_IN_FLIGHT`` of a stream at once, so that steps
    of different sessions reach the span's batcher together); answers go out in request order."""
    answers: asyncio.Queue = asyncio.Queue(maxsize=MAX_IN_FLIGHT)  # each request's answer (a task or a future), in order
    sending = asyncio.create_task(_send_answers(answers, writer, one_way))
    try:
        while await _read_one(context, reader, writer, handler, max_bytes, one_way, answers):
            pass
        await answers.put(None)
        await sending  # the requests read so far are handled to the end, also when the reader went away
    finally:
        if not sending.done():  # cancelled (shutdown): so are the requests in flight
            sending.cancel()
            while not answers.empty():
                pending = answers.get_nowait()
                if pending is not None:
                    pending.cancel()


async def _read_one(context: P2PContext, reader, writer, handler: Handler, max_bytes: int, one_way: bool,
                    answers: asyncio.Queue) -> bool:
    """Reads the next request and queues its handling; False when the stream is over."""
    try:
        request = await read_frame(reader, runtime_pb2.ExpertRequest, max_bytes)
    except (asyncio.IncompleteReadError, ConnectionError):
        return False  # its peer went away
    except FrameError as error:
        if one_way and not error.fatal:
            logger.info("%s: dropped a message from %s: %s", context.handle_name, context.remote_id, error)
            return True
        answer = asyncio.get_running_loop().create_future()
        answer.set_result(codec.error_reply(str(error)))
        await answers.put(answer)
        return not error.fatal
    if request is None:
        return False  # the caller closed the stream
    if request.uid != BUNDLE_UID:
        await answers.put(asyncio.create_task(_handle(handler, request, context)))
        return True
    try:
        if not one_way:
            raise FrameError("a bundle of messages may only come on a one-way stream", fatal=False)
        parts = unbundle(request)
    except FrameError as error:
        logger.info("%s: dropped a bundle from %s: %s", context.handle_name, context.remote_id, error)
        return True
    for part in parts:
        await answers.put(asyncio.create_task(_handle(handler, part, context)))
    return True


def bundle(requests: list[runtime_pb2.ExpertRequest]) -> runtime_pb2.ExpertRequest:
    """Several one-way messages in one frame: their tensors in order, and per message (uid, metadata, tensors)."""
    packed = runtime_pb2.ExpertRequest(uid=BUNDLE_UID, metadata=codec.pack_metadata(
        {"v": 1, "parts": [[request.uid, request.metadata, len(request.tensors)] for request in requests]}))
    for request in requests:
        packed.tensors.extend(request.tensors)
    return packed


def unbundle(packed: runtime_pb2.ExpertRequest) -> list[runtime_pb2.ExpertRequest]:
    """The messages of a bundle; FrameError (not fatal: the framing holds) when it is malformed."""
    try:
        index = codec.unpack_metadata(packed.metadata, MAX_BUNDLE_INDEX_BYTES + 4096)
    except EfedllmError as error:
        raise FrameError(f"bundle: {error}", fatal=False) from None
    if index.get("v") != 1:
        raise FrameError(f"bundle: version {index.get('v')!r} is not 1", fatal=False)
    parts = index.get("parts")
    if not isinstance(parts, list) or not 1 <= len(parts) <= MAX_BUNDLE_MESSAGES or not all(
            isinstance(part, list) and len(part) == 3 and isinstance(part[0], str) and part[0] != BUNDLE_UID
            and isinstance(part[1], bytes) and isinstance(part[2], int) and part[2] >= 0 for part in parts):
        raise FrameError(f"bundle: its index must be 1..{MAX_BUNDLE_MESSAGES} [uid, metadata, tensor count] entries",
                         fatal=False)
    if sum(part[2] for part in parts) != len(packed.tensors):
        raise FrameError(f"bundle: its index counts {sum(part[2] for part in parts)} tensors, it holds {len(packed.tensors)}",
                         fatal=False)
    requests, start = [], 0
    for uid, metadata, count in parts:
        requests.append(runtime_pb2.ExpertRequest(uid=uid, metadata=metadata, tensors=packed.tensors[start:start + count]))
        start += count
    return requests


async def _handle(handler: Handler, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
    try:
        return await handler(request, context)
    except Exception as error:  # a bug must answer this request only, not end the other sessions' stream
        logger.exception("%s failed on a request from %s", context.handle_name, context.remote_id)
        return codec.error_reply(f"internal error: {type(error).__name__}: {error}")


async def _send_answers(answers: asyncio.Queue, writer, one_way: bool) -> None:
    """Writes each answer when it is ready, in request order; after the stream breaks, lets the rest finish."""
    broken = False
    while (answer := await answers.get()) is not None:
        response = await answer
        if one_way or broken:
            continue
        try:
            await P2P.send_protobuf(response, writer)
        except ConnectionError:
            broken = True


# client side ---------------------------------------------------------------------------------
class RequestChannel:
    """One open stream to one peer: requests whose responses are matched to them by order (``call``),
    or one-way messages (``send``)."""

    def __init__(self, peer_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_bytes: int,
                 unanswered_window: float = 30.0) -> None:
        self.peer_id, self._reader, self._writer, self._max_bytes = peer_id, reader, writer, max_bytes
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._unanswered: dict[str, tuple[float, Callable[[str], None]]] = {}  # one-way messages' key -> (sent at, on_broken)
        self._unanswered_window = unanswered_window
        self.closed_because: str | None = None
        self.last_used = time.monotonic()
        self._reading: asyncio.Task | None = None
        self._outbox: list[runtime_pb2.ExpertRequest] = []  # one-way messages of this event-loop turn
        self._outbox_bytes = self._outbox_index_bytes = 0

    def start(self) -> "RequestChannel":
        """Starts reading responses (on the running event loop); the constructor does nothing of the kind."""
        self._reading = asyncio.create_task(self._read_responses())
        return self

    async def call(self, request: runtime_pb2.ExpertRequest, timeout: float) -> runtime_pb2.ExpertResponse:
        if self.closed_because is not None:
            raise ChannelError(self.closed_because)
        self.last_used = time.monotonic()
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append(answer)
        try:
            await P2P.send_protobuf(request, self._writer)  # the whole frame is written before the first await
        except Exception as error:
            self.close(f"stream to {self.peer_id} broke while sending: {error!r}")
        try:
            return await asyncio.wait_for(asyncio.shield(answer), timeout)
        except asyncio.TimeoutError:
            # the answer may still come, but nobody waits for it; later requests must not wait behind a stuck peer
            self.close(f"no answer from {self.peer_id} within {timeout} s")
            raise ChannelError(self.closed_because) from None

    async def send(self, request: runtime_pb2.ExpertRequest, on_broken: Callable[[str], None] | None = None,
                   key: str = "") -> None:
        """Queues a one-way message; ``on_broken(reason)`` is called if the stream breaks before the
        next message with the same ``key``, or ``unanswered_window`` s, whichever comes first. Messages
        queued in one event-loop turn go out as one bundle frame (:func:`bundle`)."""
        if self.closed_because is not None:
            raise ChannelError(self.closed_because)
        self.last_used = now = time.monotonic()
        for stale in [armed for armed, (sent_at, _) in self._unanswered.items() if now - sent_at > self._unanswered_window]:
            del self._unanswered[stale]
        if on_broken is not None:
            self._unanswered[key] = (now, on_broken)
        index_bytes = len(request.uid) + len(request.metadata) + 16
        if self._outbox and (self._outbox_index_bytes + index_bytes > MAX_BUNDLE_INDEX_BYTES
                             or len(self._outbox) == MAX_BUNDLE_MESSAGES):
            self._flush()
        self._outbox.append(request)
        self._outbox_bytes += request.ByteSize()
        self._outbox_index_bytes += index_bytes
        if len(self._outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush)  # after the other senders of this turn
        if self._outbox_bytes >= MAX_BUNDLE_BYTES:
            self._flush()
        if self._writer.transport.get_write_buffer_size() > MAX_BUNDLE_BYTES:
            await self._writer.drain()  # the peer reads slower than this peer sends: wait, do not buffer without end

    def _flush(self) -> None:
        """Writes the queued one-way messages as one frame (a bundle when there are several)."""
        if not self._outbox or self.closed_because is not None:
            self._outbox.clear()
            return
        frame = self._outbox[0] if len(self._outbox) == 1 else bundle(self._outbox)
        self._outbox, self._outbox_bytes, self._outbox_index_bytes = [], 0, 0
        try:
            data = frame.SerializeToString()
            self._writer.write(P2P.MESSAGE_MARKER + len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + data)
        except Exception as error:
            self.close(f"stream to {self.peer_id} broke while sending: {error!r}")

    async def _read_responses(self) -> None:
        reason = f"stream to {self.peer_id} was closed by the peer"
        try:
            while True:
                response = await read_frame(self._reader, runtime_pb2.ExpertResponse, self._max_bytes)
                if response is None:
                    break
                if not self._waiting:
                    reason = f"{self.peer_id} answered no request (an error before it closed?): {response.metadata[:300]!r}"
                    break
                answer = self._waiting.popleft()
                if not answer.done():
                    answer.set_result(response)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except FrameError as error:
            reason = f"bad response from {self.peer_id}: {error}"
        except asyncio.CancelledError:
            return
        self.close(reason)

    def close(self, reason: str = "channel closed", broken: bool = True) -> None:
        """Ends the stream; ``broken`` (not an idle or final close) also calls the armed ``on_broken``s."""
        if self.closed_because is not None:
            return
        if not broken:
            self._flush()  # what was queued this turn still goes out
        self.closed_because = reason
        while self._waiting:
            answer = self._waiting.popleft()
            if not answer.done():
                answer.set_exception(ChannelError(reason))
        unanswered, self._unanswered = self._unanswered, {}
        for _, on_broken in unanswered.values() if broken else ():
            try:
                on_broken(reason)
            except Exception:
                logger.exception("on_broken callback failed")
        if self._reading is not None and self._reading is not asyncio.current_task():
            self._reading.cancel()
        self._writer.close()


class ChannelPool:
    """Open streams to peers' ``name`` handler, one per peer, opened on first use and reopened after a failure."""

    def __init__(self, p2p: P2P, name: str, max_message_bytes: int = MAX_MESSAGE_BYTES, unanswered_window: float = 30.0) -> None:
        self.p2p, self.name, self.max_message_bytes = p2p, name, max_message_bytes
        self.unanswered_window = unanswered_window
        self._channels: dict[str, RequestChannel] = {}
        self._opening: dict[str, asyncio.Lock] = {}

    async def call(self, peer_id: str, request: runtime_pb2.ExpertRequest, timeout: float) -> runtime_pb2.ExpertResponse:
        return await (await self._channel(peer_id, timeout)).call(request, timeout)

    async def send(self, peer_id: str, request: runtime_pb2.ExpertRequest, on_broken: Callable[[str], None] | None = None,
                   key: str = "", timeout: float = 30.0) -> None:
        """A one-way message (see ``RequestChannel.send``); ``timeout`` bounds opening the stream."""
        await (await self._channel(peer_id, timeout)).send(request, on_broken, key)

    async def _channel(self, peer_id: str, timeout: float) -> RequestChannel:
        channel = self._channels.get(peer_id)
        if channel is not None and channel.closed_because is None:
            return channel  # no event-loop turn before the write on an open stream
        return await asyncio.wait_for(self._open(peer_id), timeout)

    async def _open(self, peer_id: str) -> RequestChannel:
        async with self._opening.setdefault(peer_id, asyncio.Lock()):  # two first calls must not open two streams
            channel = self._channels.get(peer_id)
            if channel is None or channel.closed_because is not None:
                try:
                    _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), self.name)
                except Exception as error:
                    raise ChannelError(f"cannot open a stream to {peer_id}: {error!r}") from None
                channel = RequestChannel(peer_id, reader, writer, self.max_message_bytes, self.unanswered_window).start()
                self._channels[peer_id] = channel
            return channel

    def close_idle(self, max_idle: float) -> int:
        now, closed = time.monotonic(), 0
        for peer_id, channel in list(self._channels.items()):
            if channel.closed_because is not None or now - channel.last_used > max_idle:
                channel.close(f"stream to {peer_id} idle for {max_idle} s", broken=False)
                del self._channels[peer_id]
                self._opening.pop(peer_id, None)
                closed += 1
        return closed

    def close_all(self) -> None:
        for channel in self._channels.values():
            channel.close(broken=False)
        self._channels.clear()
        self._opening.clear()
