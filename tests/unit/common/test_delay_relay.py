"""The delay relay used by the wide-area benchmark: bytes arrive whole and in order, EOF passes through."""

from __future__ import annotations

import asyncio
import os

import pytest

from efedllm.common.delay_relay import Route, main, serve_routes


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(4096):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_a_relayed_connection_carries_every_byte_in_order_both_ways_and_passes_eof_on():
    async def scenario():
        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        relays = await serve_routes([Route(0, target.sockets[0].getsockname()[1])], delay=0.005)
        reader, writer = await asyncio.open_connection("127.0.0.1", relays[0].sockets[0].getsockname()[1])
        payload = os.urandom(3 * 2**20 + 17)  # several chunks, queued behind each other
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        received = await asyncio.wait_for(reader.read(), timeout=30)  # to EOF: the echo closed after ours
        writer.close()
        for server in (*relays, target):
            server.close()
        return payload, received

    payload, received = asyncio.run(scenario())
    assert received == payload


@pytest.mark.parametrize("text", ["80", "a:b", "1:0", "70000:80", "-1:80"])
def test_a_bad_route_is_refused_naming_it(text):
    with pytest.raises(ValueError, match="route"):
        Route.parse(text)


def test_the_command_line_refuses_a_negative_delay(capsys):
    with pytest.raises(SystemExit):
        main(["--delay-ms", "-1", "--route", "0:80"])
    assert "--delay-ms must be >= 0" in capsys.readouterr().err
