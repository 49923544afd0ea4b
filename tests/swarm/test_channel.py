"""Open request/response streams between two real hivemind peers on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from efedllm.protocol import codec
from efedllm.protocol.channel import ChannelError, ChannelPool, read_frame, serve_requests
from efedllm.protocol.messages import Reply

pytestmark = pytest.mark.swarm
NAME = "test.echo.stream"


def raw_request(data: dict) -> runtime_pb2.ExpertRequest:
    """A request of any metadata: the channel carries protobufs and looks at nothing inside them."""
    return runtime_pb2.ExpertRequest(metadata=codec.pack_metadata(data))


def raw_response(data: dict) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=codec.pack_metadata(data))


async def echo(request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
    """Answers with the request's metadata and its sender; "sleep" and "fail" misbehave on purpose."""
    data = codec.unpack_metadata(request.metadata)
    if data.get("sleep"):
        await asyncio.sleep(data["sleep"])
    if data.get("fail"):
        raise RuntimeError("asked to fail")
    return raw_response({"ok": True, "echo": data, "from": context.remote_id.to_base58()})


def frame(message: runtime_pb2.ExpertRequest | bytes, marker: bytes = P2P.MESSAGE_MARKER, length: int | None = None) -> bytes:
    body = message if isinstance(message, bytes) else message.SerializeToString()
    return marker + (len(body) if length is None else length).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body


async def two_peers():
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = await P2P.create(initial_peers=await server.get_visible_maddrs())
    return server, client


def test_requests_get_their_own_answers_in_order_and_bad_frames_get_errors():
    async def scenario():
        server, client = await two_peers()
        try:
            await serve_requests(server, NAME, echo, max_message_bytes=4096)
            pool = ChannelPool(client, NAME, max_message_bytes=4096)
            peer = server.peer_id.to_base58()
            # concurrent calls on one stream: each gets the answer to its own request
            answers = await asyncio.gather(*(
                pool.call(peer, raw_request({"n": n, "sleep": 0.01 * (n % 3)}), 10.0) for n in range(12)))
            replies = [codec.unpack_metadata(answer.metadata) for answer in answers]
            assert [reply["echo"]["n"] for reply in replies] == list(range(12))
            assert {reply["from"] for reply in replies} == {client.peer_id.to_base58()}
            # a handler that raises answers that request with an error; the stream goes on
            failed = codec.read_message(Reply, await pool.call(peer, raw_request({"fail": True}), 10.0))
            assert not failed.ok and "asked to fail" in failed.error
            assert codec.unpack_metadata((await pool.call(peer, raw_request({"n": 99}), 10.0)).metadata)["ok"]

            # raw frames: garbage is answered and the stream goes on; an oversized frame ends the stream
            _, reader, writer = await client.call_binary_stream_handler(server.peer_id, NAME)
            writer.write(frame(b"\xff\xff\xff garbage"))
            garbage = await read_response(reader)
            assert "not a valid ExpertRequest" in codec.unpack_metadata(garbage.metadata)["error"]
            writer.write(frame(b"", length=10**9))
            oversized = await read_response(reader)
            assert "exceeds the limit of 4096" in codec.unpack_metadata(oversized.metadata)["error"]
            assert await reader.read() == b""  # the server closed this stream
            writer.close()
            # ... and only that one: the pool's stream still serves
            assert codec.unpack_metadata((await pool.call(peer, raw_request({"n": 100}), 10.0)).metadata)["ok"]
            # a request above the limit is refused by the server, naming the size
            big = await pool.call(peer, raw_request({"pad": "x" * 5000}), 10.0)
            assert "exceeds the limit" in codec.unpack_metadata(big.metadata)["error"]
            pool.close_all()
        finally:
            await client.shutdown()
            await server.shutdown()

    asyncio.run(scenario())


async def read_response(reader) -> runtime_pb2.ExpertResponse:
    return await asyncio.wait_for(read_frame(reader, runtime_pb2.ExpertResponse, 4096), 10.0)


def test_timeouts_and_a_dead_peer_fail_the_waiting_calls_and_the_stream_is_replaced():
    async def scenario():
        server, client = await two_peers()
        try:
            await serve_requests(server, NAME, echo)
            pool = ChannelPool(client, NAME)
            peer = server.peer_id.to_base58()
            with pytest.raises(ChannelError, match="no answer .* within 0.2 s"):
                await pool.call(peer, raw_request({"sleep": 1.0}), 0.2)
            # the stuck stream was dropped: the next call opens a new one and is not stuck behind it
            assert codec.unpack_metadata((await pool.call(peer, raw_request({"n": 1}), 5.0)).metadata)["ok"]
            waiting = asyncio.ensure_future(pool.call(peer, raw_request({"sleep": 30}), 60.0))
            await asyncio.sleep(0.5)
            await server.shutdown()  # the peer and its daemon go away mid-call
            with pytest.raises(ChannelError):
                await asyncio.wait_for(waiting, 20.0)
            with pytest.raises(ChannelError):
                await pool.call(peer, raw_request({"n": 2}), 5.0)
            pool.close_all()
        finally:
            await client.shutdown()
            await server.shutdown()

    asyncio.run(scenario())


def test_one_way_messages_arrive_in_order_and_a_lost_peer_calls_on_broken_once_per_key():
    async def scenario():
        server, client = await two_peers()
        received = []

        async def record(request, context) -> None:
            data = codec.unpack_metadata(request.metadata)
            if data.get("fail"):
                raise RuntimeError("a one-way handler failed")  # logged; nothing goes back
            received.append(data["n"])

        try:
            await serve_requests(server, NAME, record, one_way=True)
            pool = ChannelPool(client, NAME, unanswered_window=60.0)
            peer, broken = server.peer_id.to_base58(), []
            await pool.send(peer, raw_request({"fail": True}))
            for n in range(10):  # sessions "a" and "b" each arm on_broken; each new message re-arms its key
                await pool.send(peer, raw_request({"n": n}), lambda reason, n=n: broken.append(n), key="ab"[n % 2])
            for _ in range(100):
                if len(received) == 10:
                    break
                await asyncio.sleep(0.05)
            assert received == list(range(10))
            await server.shutdown()
            for _ in range(200):
                if broken:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            assert sorted(broken) == [8, 9]  # only each key's last message is reported lost
            with pytest.raises(ChannelError):
                await pool.send(peer, raw_request({"n": 10}), timeout=5.0)
            pool.close_all()
        finally:
            await client.shutdown()
            await server.shutdown()

    asyncio.run(scenario())
