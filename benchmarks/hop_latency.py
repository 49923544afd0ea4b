"""One hop between two processes on 127.0.0.1: a hivemind unary call vs a request on an open stream
(``efedllm.protocol.channel``), carrying one token's float32 hidden state (576 floats) and step-sized metadata.
Prints one JSON line: median one-way latency (request sent -> handler entered, both clocks are this
machine's monotonic clock) and round trip, in ms, for each idle gap between messages. A chain's
servers sit idle ~40-60 ms between decode steps; the 5 ms gap shows the same peers kept busy.

Usage: python benchmarks/hop_latency.py [--messages N] [--gaps-ms 5 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time

import msgpack
import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr

from efedllm.common.spans import Span
from efedllm.protocol import codec
from efedllm.protocol.channel import ChannelPool, serve_requests
from efedllm.protocol.messages import StepRequest

STREAM = "HopLatency.rpc_hop.stream"


class HopLatency(ServicerBase):
    """Records when each request entered the handler; ``rpc_arrivals`` hands the record over and clears it."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []

    async def rpc_hop(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        self.arrivals.append(time.perf_counter())
        return codec.ok_reply()

    async def rpc_arrivals(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        arrivals, self.arrivals = self.arrivals, []
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb(arrivals))


def serve(addresses, stop) -> None:
    async def main() -> None:
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        servicer = HopLatency()
        await servicer.add_p2p_handlers(p2p)
        await serve_requests(p2p, STREAM, servicer.rpc_hop)
        addresses.put([str(address) for address in await p2p.get_visible_maddrs()])
        await asyncio.get_running_loop().run_in_executor(None, stop.wait, 3600)
        await p2p.shutdown()  # also stops its p2p daemon


    asyncio.run(main())


async def measure(addresses: list[str], messages: int, gaps_ms: list[float]) -> dict:
    p2p = await P2P.create(initial_peers=[Multiaddr(address) for address in addresses])
    peer = PeerID.from_base58(addresses[0].split("/p2p/")[1])
    stub, pool = HopLatency.get_stub(p2p, peer), ChannelPool(p2p, STREAM)
    step = StepRequest("0" * 32, Span(0, 10), 17)  # a decode step's metadata and hidden state
    request = codec.request(step, codec.encode_hidden(torch.randn(1, 1, 576), "float32"))
    ways = {"unary": lambda: stub.rpc_hop(request), "stream": lambda: pool.call(peer.to_base58(), request, 10.0)}
    results = {}
    for gap_ms in gaps_ms:
        for name, call in ways.items():
            for _ in range(20):  # warm-up: connections, the stream, code paths
                await call()
            await stub.rpc_arrivals(request)
            sent, round_trips = [], []
            for _ in range(messages):
                await asyncio.sleep(gap_ms / 1000)
                sent.append(time.perf_counter())
                await call()
                round_trips.append(time.perf_counter() - sent[-1])
            arrivals = msgpack.unpackb((await stub.rpc_arrivals(request)).metadata)
            results[f"{name}_gap_{gap_ms:g}ms"] = {
                "one_way_ms": round(1e3 * statistics.median(b - a for a, b in zip(sent, arrivals)), 3),
                "round_trip_ms": round(1e3 * statistics.median(round_trips), 3)}
    pool.close_all()
    await p2p.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--gaps-ms", type=float, nargs="+", default=[5.0, 60.0])
    args = parser.parse_args()
    if args.messages < 1 or any(gap < 0 for gap in args.gaps_ms):
        parser.error("--messages must be at least 1 and --gaps-ms non-negative")
    context = multiprocessing.get_context("spawn")
    addresses, stop = context.Queue(), context.Event()
    server = context.Process(target=serve, args=(addresses, stop), daemon=True)
    server.start()
    try:
        results = asyncio.run(measure(addresses.get(timeout=60), args.messages, args.gaps_ms))
    finally:
        stop.set()
        server.join(timeout=10)
        if server.is_alive():
            server.kill()
    print(json.dumps({"benchmark": "hop_latency", "messages": args.messages, **results}))


if __name__ == "__main__":
    main()
