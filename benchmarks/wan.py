"""A wide-area swarm on one machine: chained vs relayed steps with a fixed one-way delay in front of each server.

This kernel has no netem, so each of 3 servers (SmolLM2-135M, 10 blocks each) listens on its own port and
announces (``--announce-maddrs``) the port of a TCP relay (:mod:`efedllm.common.delay_relay`) that delays
every byte by ``D`` ms in each direction. Every peer reaches a server only through its relay, so each hop
between two peers costs one one-way delay: a chained step (client -> s1 -> s2 -> s3 -> client) costs 4, a
relayed one (client -> s_i -> client, three times; Petals' way) 6. The client and the bootstrap DHT node
are not delayed.

For each delay, a fresh swarm; two clients, one chained and one relayed, generate ``--tokens`` greedy
tokens alternately, ``--rounds`` times each; the best tokens/s of each counts. Also printed: the
per-token time each mode would take if it paid exactly its 4 or 6 delays on top of the 0 ms run's
per-token time (``predicted_*``). Prints one JSON line.
Usage: python benchmarks/wan.py [--delays-ms 0 5 20 50] [--tokens 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the efedllm CLI does (server/swarm.py): before torch loads

from efedllm.client.config import RemoteClientConfig  # noqa: E402
from efedllm.client.remote import DistributedModelForCausalLM  # noqa: E402
from efedllm.client.sampling import GenerationConfig  # noqa: E402
from efedllm.common.delay_relay import RelayProcess, free_port  # noqa: E402
from efedllm.server.swarm import LocalSwarm  # noqa: E402

MODEL = "smollm2-135m"
SPANS = ("0:10", "10:20", "20:30")
PROMPT = "Write a short story about a lighthouse keeper."


def measure(delay_ms: float, tokens: int, rounds: int, server_threads: int) -> dict:
    ports = [free_port() for _ in SPANS]
    with RelayProcess(ports, delay_ms) as relays, LocalSwarm(MODEL) as swarm:
        swarm.start_bootstrap()
        for blocks, port, relay_port in zip(SPANS, ports, relays.ports):
            swarm.start_server(blocks, extra=["--no-rebalance", "--torch-threads", str(server_threads), "--port", str(port),
                                              "--announce-maddrs", f"/ip4/127.0.0.1/tcp/{relay_port}"])
        swarm.wait_until_online(len(SPANS))
        clients = {mode: DistributedModelForCausalLM.from_pretrained(
            MODEL, initial_peers=swarm.initial_peers, config=RemoteClientConfig(relay=mode == "relayed"))
            for mode in ("chained", "relayed")}
        config, speeds = GenerationConfig(max_new_tokens=tokens, greedy=True, stop_on_eos=False), {}
        try:
            for mode, client in clients.items():
                client.generate(client.encode_prompt(PROMPT), GenerationConfig(max_new_tokens=2, greedy=True))  # warm-up
            for _ in range(rounds):
                for mode, client in clients.items():
                    result = client.generate(client.encode_prompt(PROMPT), config)
                    speeds[mode] = max(speeds.get(mode, 0.0), result.tokens_per_s)
        finally:
            for client in clients.values():
                client.shutdown()
    return {"delay_ms": delay_ms, "chained_tokens_per_s": round(speeds["chained"], 2),
            "relayed_tokens_per_s": round(speeds["relayed"], 2),
            "chained_over_relayed": round(speeds["chained"] / speeds["relayed"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delays-ms", type=float, nargs="+", default=[0, 5, 20, 50])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--server-threads", type=int, default=1)
    args = parser.parse_args()
    runs = [measure(delay, args.tokens, args.rounds, args.server_threads) for delay in args.delays_ms]
    base = next((run for run in runs if run["delay_ms"] == 0), None)
    for run in runs:
        if base is not None:
            for mode, hops in (("chained", 4), ("relayed", 6)):
                seconds = 1 / base[f"{mode}_tokens_per_s"] + hops * run["delay_ms"] / 1000
                run[f"predicted_{mode}_tokens_per_s"] = round(1 / seconds, 2)
    print(json.dumps({"model": MODEL, "servers": len(SPANS), "tokens": args.tokens, "rounds": args.rounds,
                      "one_way_delays_per_step": {"chained": 4, "relayed": 6}, "runs": runs}))


if __name__ == "__main__":
    main()
