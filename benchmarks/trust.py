"""The verifier on a real swarm on 127.0.0.1: detection rate and rounds to detection per fault mode over
repetitions, false deactivation rate of honest servers (one of them bfloat16), probe traffic against
client traffic, and client tokens/s with verification running vs not. Prints one JSON line.

Every repetition forgets the verifier's history and draws other probes (another seed); the
servers keep running. ``--repetitions`` and ``--max-rounds`` bound the time.

Speed is measured after the faulty servers have been stopped (SIGTERM, they announce themselves
offline): every process shares this machine's 2 cores, and probing six servers that no client
uses would take CPU from the client's chain, which in a federation runs on other machines. The
probes of the honest servers the client uses do overlap its generation, as they would for real.
The client generates in a process of its own (a client and a verifier are different peers) with
one torch thread, in the off windows as in the on windows.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the efedllm CLI does (server/swarm.py): before torch loads

from efedllm.client.config import RemoteClientConfig  # noqa: E402
from efedllm.client.remote import DistributedModelForCausalLM  # noqa: E402
from efedllm.client.sampling import GenerationConfig  # noqa: E402
from efedllm.server.swarm import LocalSwarm, peer_id_of  # noqa: E402
from efedllm.verifier.config import VerifierConfig  # noqa: E402
from efedllm.verifier.node import Verifier, VerifierNodeConfig  # noqa: E402

MODEL = "smollm2-135m"
HONEST = {"honest-0": ("0:10", []), "honest-1": ("10:20", []), "honest-2": ("20:30", []),
          "honest-bf16": ("10:20", ["--dtype", "bfloat16"])}
FAULTS = {"noise:0.01": "0:10", "zeros": "10:20", "skip-blocks": "20:30", "random": "10:20", "wrong-model": "0:10",
          "intermittent:0.1": "20:30"}
GREEDY = GenerationConfig(max_new_tokens=32, greedy=True, stop_on_eos=False)
PROMPT = "Write a short story about a lighthouse keeper."


def detection_runs(verifier: Verifier, peers: dict[str, str], repetitions: int, max_rounds: int) -> dict:
    honest = {peers[name] for name in HONEST}
    rounds_to_detect = {fault: [] for fault in FAULTS}
    false_deactivations = honest_judgements = 0
    probe_bytes = []
    for repetition in range(repetitions):
        verifier.forget_history(seed=repetition)
        pending = {peers[fault]: fault for fault in FAULTS}
        for round_index in range(1, max_rounds + 1):
            report = verifier.run_round()
            probe_bytes.append(report.probe_bytes)
            false_deactivations += len(report.inactive & honest)
            honest_judgements += len(honest)
            for peer in report.inactive & pending.keys():
                rounds_to_detect[pending.pop(peer)].append(round_index)
            if not pending:
                break
    return {
        "detection": {
            fault: {"rate": len(rounds) / repetitions,
                    "rounds_median": statistics.median(rounds) if rounds else None,
                    "rounds_max": max(rounds) if rounds else None}
            for fault, rounds in rounds_to_detect.items()
        },
        "false_deactivation_rate": false_deactivations / max(1, honest_judgements),
        "honest_judgements": honest_judgements,
        "probe_bytes_per_round": statistics.mean(probe_bytes),
    }


def _generate_in_own_process(initial_peers: list[str], verifier_key: str, windows, results) -> None:
    """A client process: warm up, say "ready", then for each window length from ``windows`` generate
    back to back for that long and report; ``None`` ends it."""
    import torch

    torch.set_num_threads(1)  # as in swarm_vs_local.py: idle spinning workers would take the servers' cores
    client = DistributedModelForCausalLM.from_pretrained(MODEL, initial_peers,
                                                        RemoteClientConfig(trusted_verifier_keys=(verifier_key,)))
    try:
        input_ids = client.encode_prompt(PROMPT)
        client.generate(input_ids, GREEDY)  # warm-up
        results.put("ready")
        while (seconds := windows.get()) is not None:
            client.bytes_sent, tokens, busy = 0, 0, 0.0
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                result = client.generate(input_ids, GREEDY)
                tokens, busy = tokens + result.new_tokens, busy + result.seconds
            results.put({"tokens": tokens, "busy": busy, "client_bytes": client.bytes_sent})
    finally:
        client.shutdown()


class ClientProcess:
    """The client generates in a process of its own, as a client and a verifier are different peers:
    in one process they would contend for one interpreter lock, which no real deployment shares."""

    def __init__(self, swarm: LocalSwarm, verifier: Verifier) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.windows, self.results = context.Queue(), context.Queue()
        self.process = context.Process(target=_generate_in_own_process,  # not a daemon: it starts a DHT process
                                       args=(swarm.initial_peers, verifier.key, self.windows, self.results))

    def __enter__(self) -> "ClientProcess":
        self.process.start()
        self.wait(timeout=300)
        return self

    def __exit__(self, *exc_info) -> None:
        self.windows.put(None)
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()

    def wait(self, timeout: float):
        """The client process's next message; an error as soon as that process has died."""
        import queue

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(f"the client process exited with code {self.process.exitcode}") from None
        raise TimeoutError(f"no word from the client process in {timeout:.0f} s")


def client_speed(client: ClientProcess, verifier: Verifier, interval_s: float | None, seconds: float) -> dict:
    """Client tokens/s over ``seconds`` of back-to-back generations, with verifier rounds every ``interval_s``
    seconds beside them (``None``: no verification; 0: rounds back to back, the worst case)."""
    # the verifier's own reference forward passes run before the window, as they would on the
    # verifier's own machine; what overlaps the client is the probing of the servers
    traces = [verifier.prepare_trace() for _ in range(_expected_rounds(interval_s, seconds))]
    client.windows.put(seconds)
    window_ends = time.monotonic() + seconds
    rounds, probe_bytes = 0, 0
    next_round = time.monotonic() + (interval_s or 0.0) / 2  # mid-window: one round per interval
    while time.monotonic() < window_ends:
        if interval_s is not None and time.monotonic() >= next_round:
            probe_bytes += verifier.run_round(traces.pop() if traces else None).probe_bytes
            rounds += 1
            next_round += interval_s
        else:
            time.sleep(0.1)
    measured = client.wait(timeout=seconds + 120)  # a generation may be under way when the window ends
    return {"tokens_per_s": round(measured["tokens"] / measured["busy"], 2), "client_bytes": measured["client_bytes"],
            "rounds": rounds, "probe_bytes": probe_bytes, "tokens": measured["tokens"]}


def _stop_faulty(swarm: LocalSwarm, started: dict) -> None:
    from efedllm.dht.records import ServerState

    faulty = {peer_id_of(server) for name, server in started.items() if name in FAULTS}
    for name, server in started.items():
        if name in FAULTS:  # all at once, without waiting: each announces itself offline as it leaves
            swarm.send_signal(server, signal.SIGTERM)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        online = {peer for peer, info in swarm.server_records()[0].items() if info.state is ServerState.ONLINE}
        if not online & faulty:
            return
        time.sleep(0.5)
    raise TimeoutError("the faulty servers still look online two minutes after SIGTERM")


def _expected_rounds(interval_s: float | None, seconds: float) -> int:
    if interval_s is None:
        return 0
    return 40 if interval_s == 0 else int(seconds / interval_s) + 2


def _combine(runs: list[dict]) -> dict:
    tokens = sum(run["tokens"] for run in runs)
    busy = sum(run["tokens"] / run["tokens_per_s"] for run in runs)
    return {"tokens_per_s": round(tokens / busy, 2), "tokens": tokens, "rounds": sum(run["rounds"] for run in runs),
            "client_bytes": sum(run["client_bytes"] for run in runs), "probe_bytes": sum(run["probe_bytes"] for run in runs),
            "per_window_tokens_per_s": [run["tokens_per_s"] for run in runs]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--max-rounds", type=int, default=25)
    parser.add_argument("--decode-steps", type=int, default=VerifierNodeConfig.decode_steps,
                        help="decode steps per probe (default: efedllm verify's)")
    parser.add_argument("--interval", type=float, default=30.0,
                        help="seconds between verifier rounds during the on windows (efedllm verify's default)")
    parser.add_argument("--speed-seconds", type=float, default=30.0, help="length of each client speed window")
    parser.add_argument("--speed-pairs", type=int, default=3, help="alternating off/on speed windows")
    parser.add_argument("--speed-only", action="store_true", help="skip the detection repetitions")
    args = parser.parse_args()
    servers = {**HONEST, **{fault: (blocks, ["--fault", fault]) for fault, blocks in FAULTS.items()}}
    with LocalSwarm(MODEL) as swarm, tempfile.TemporaryDirectory() as scratch:
        swarm.start_bootstrap()
        if args.speed_only:
            servers = dict(HONEST)
        started = {name: swarm.start_server(blocks, extra=["--no-rebalance", *extra]) for name, (blocks, extra) in servers.items()}
        swarm.wait_until_online(len(started), timeout=300)
        peers = {name: peer_id_of(server) for name, server in started.items()}
        decisions = VerifierConfig(ledger_path=Path(scratch) / "ledger.sqlite")
        verifier = Verifier(VerifierNodeConfig(MODEL, tuple(swarm.initial_peers), decode_steps=args.decode_steps,
                                               jitter_s=0.05, torch_threads=1, decisions=decisions))
        try:
            verifier.start()
            result = {} if args.speed_only else detection_runs(verifier, peers, args.repetitions, args.max_rounds)
            print(f"detection: {json.dumps(result)}", file=sys.stderr, flush=True)
            _stop_faulty(swarm, started)
            # off and on alternate in windows: this machine's speed drifts by +-20% over minutes
            with ClientProcess(swarm, verifier) as client:
                windows = [(client_speed(client, verifier, None, args.speed_seconds),
                            client_speed(client, verifier, args.interval, args.speed_seconds))
                           for _ in range(args.speed_pairs)]
                continuous = client_speed(client, verifier, 0.0, args.speed_seconds)
            off, on = (_combine([pair[index] for pair in windows]) for index in (0, 1))
        finally:
            verifier.shutdown()
    result.update({
        "repetitions": args.repetitions, "max_rounds": args.max_rounds, "decode_steps": args.decode_steps,
        "verifier_interval_s": args.interval, "speed_window_s": args.speed_seconds,
        "client_tokens_per_s_verification_off": off["tokens_per_s"],
        "client_tokens_per_s_verification_on": on["tokens_per_s"],
        "on_over_off": round(on["tokens_per_s"] / off["tokens_per_s"], 3),
        "client_tokens_per_s_rounds_back_to_back": continuous["tokens_per_s"],
        "back_to_back_over_off": round(continuous["tokens_per_s"] / off["tokens_per_s"], 3),
        "probe_traffic_percent_of_client_traffic": round(100 * on["probe_bytes"] / max(1, on["client_bytes"]), 1),
        "rounds_during_on_runs": on["rounds"], "client_tokens_during_on_runs": on["tokens"], "speed_pairs": args.speed_pairs,
        "off_windows_tokens_per_s": off["per_window_tokens_per_s"], "on_windows_tokens_per_s": on["per_window_tokens_per_s"],
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
