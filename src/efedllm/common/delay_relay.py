"""A TCP relay that delays every byte by a fixed one-way time in each direction: a wide-area link between
processes on 127.0.0.1, for benchmarks on a kernel without netem.

A server listens on its own port and announces the relay's (``efedllm serve --port P --announce-maddrs
/ip4/127.0.0.1/tcp/R``); every peer that dials it then goes through the relay, and whatever either side
writes reaches the other ``delay`` seconds later, in order, at full bandwidth (a chunk read at time t is
written at t + delay). A connection through the relay is one libp2p connection, multiplexing all streams
between the two peers, so both directions of every stream pay the delay, as over a real link.

Run as ``python -m efedllm.common.delay_relay --delay-ms D --route LISTEN:TARGET [--route ...]``; it prints
one JSON line ``{"ready": [...listen ports...]}`` once listening and runs until terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

CHUNK_BYTES = 2**16


@dataclass(frozen=True)
class Route:
    """Connections to 127.0.0.1:``listen_port`` are relayed to 127.0.0.1:``target_port``."""

    listen_port: int
    target_port: int

    @classmethod
    def parse(cls, text: str) -> "Route":
        listen, _, target = text.partition(":")
        try:
            route = cls(int(listen), int(target))
        except ValueError:
            raise ValueError(f"route {text!r} must be LISTEN_PORT:TARGET_PORT") from None
        if not (0 <= route.listen_port <= 65535 and 1 <= route.target_port <= 65535):
            raise ValueError(f"route {text!r}: ports must be in 0..65535 (target 1..65535)")
        return route


async def _delayed_copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copies ``reader`` to ``writer``, each chunk ``delay`` s after it was read; half-closes ``writer`` at EOF."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    async def read_all() -> None:
        try:
            while data := await reader.read(CHUNK_BYTES):
                queue.put_nowait((loop.time() + delay, data))
        except ConnectionError:
            pass
        queue.put_nowait((loop.time() + delay, b""))

    reading = asyncio.create_task(read_all())
    try:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()  # the other direction may still carry answers
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        writer.close()
    finally:
        reading.cancel()


async def _relay(route: Route, delay: float, downstream_reader, downstream_writer) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", route.target_port)
    except OSError:
        downstream_writer.close()
        return
    try:
        await asyncio.gather(_delayed_copy(downstream_reader, upstream_writer, delay),
                             _delayed_copy(upstream_reader, downstream_writer, delay))
    except asyncio.CancelledError:  # the relay is stopping
        pass
    finally:
        upstream_writer.close()
        downstream_writer.close()


async def serve_routes(routes: list[Route], delay: float) -> list[asyncio.Server]:
    """Starts listening on every route (on the running loop); a listen port of 0 picks a free one."""
    if delay < 0:
        raise ValueError(f"delay must be >= 0, got {delay}")
    servers = []
    for route in routes:
        servers.append(await asyncio.start_server(
            lambda reader, writer, route=route: _relay(route, delay, reader, writer), "127.0.0.1", route.listen_port))
    return servers


async def _main(routes: list[Route], delay: float) -> None:
    servers = await serve_routes(routes, delay)
    print(json.dumps({"ready": [server.sockets[0].getsockname()[1] for server in servers]}), flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of asking (for a server's --port behind a relay)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RelayProcess:
    """This module run as a subprocess relaying to ``target_ports``; ``ports`` are where it listens, in order.

    ``start()`` waits for its ready line; ``stop()`` (or leaving the ``with`` block) terminates it."""

    def __init__(self, target_ports: list[int], delay_ms: float) -> None:
        self.target_ports, self.delay_ms = list(target_ports), delay_ms
        self.process: subprocess.Popen | None = None
        self.ports: list[int] = []

    def start(self) -> "RelayProcess":
        routes = [argument for port in self.target_ports for argument in ("--route", f"0:{port}")]
        self.process = subprocess.Popen([sys.executable, "-m", __name__, "--delay-ms", str(self.delay_ms), *routes],
                                        stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()  # the relay prints its ready line at once or exits
        if not line:
            self.stop()
            raise RuntimeError(f"the delay relay exited with {self.process.returncode} before it was ready")
        self.ports = json.loads(line)["ready"]
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "RelayProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m efedllm.common.delay_relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    parser.add_argument("--route", action="append", required=True, metavar="LISTEN:TARGET")
    args = parser.parse_args(argv)
    try:
        routes = [Route.parse(text) for text in args.route]
        if args.delay_ms < 0:
            raise ValueError(f"--delay-ms must be >= 0, got {args.delay_ms}")
    except ValueError as error:
        parser.error(str(error))
    asyncio.run(_main(routes, args.delay_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
