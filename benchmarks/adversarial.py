"""Adaptive cheaters against audits of real traffic, on a real swarm on 127.0.0.1. Prints one JSON line.

Servers: honest 0:10 and 20:30, honest 10:20 in float32 and in bfloat16, and one cheater on 10:20
per adaptive rule and share (``noise:0.1;RULE;share=P``, :mod:`efedllm.server.faults`). A verifier
runs in this process (one probe round first, so the ``verdict`` rule's cheaters have seen a verdict).

Recording: for each cheater (``--shares``, default 100% and 10%), ``--sessions`` client sessions
(``--rare-sessions`` at 1%) go
first -> cheater -> last, every one audited by the real verifier: prompts of 4..16 WikiText-2
tokens, 2..12 new tokens, one session in five with 2 batch rows. Each session's verdict on each
server is real. The honest 10:20 servers get their own sessions likewise (false positives).

Repetitions: a server cannot tell an audited session from another (every session carries
receipts), so the client's private draw is resampled over the recorded sessions: each of
``--repetitions`` repetitions starts at a random session, walks the recording cyclically and audits
each session with probability ``--audit-fraction`` (the client default), until an audited session
holds a proven lie (deactivation: the verdict is published before the audit is answered) or
``--max-walks`` passes over the recording. Reported per cheater: corrupted sessions recorded,
detection rate, and the 50th/99th percentile of the cheater's client steps and seconds until
deactivation.

Speed: a client with audits on (``audit_fraction`` 0.5, receipts) and one with them off generate
on the honest float32 chain in alternating windows, in this one run, while the verifier judges the
audits of the "on" windows on this same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from efedllm.client.config import RemoteClientConfig  # noqa: E402
from efedllm.client.remote import DistributedModelForCausalLM  # noqa: E402
from efedllm.client.routing import RouteHop  # noqa: E402
from efedllm.client.sampling import GenerationConfig  # noqa: E402
from efedllm.client.session import RemoteInferenceSession  # noqa: E402
from efedllm.common.spans import Span  # noqa: E402
from efedllm.server.swarm import LocalSwarm, peer_id_of  # noqa: E402
from efedllm.verifier.config import VerifierConfig  # noqa: E402
from efedllm.verifier.node import Verifier, VerifierNodeConfig, default_corpus_path, load_passages  # noqa: E402

MODEL = "smollm2-135m"
RULES = {"after": "after=4", "longer": "longer=16", "prefill": "prefill=8", "batch": "batch", "verdict": "verdict",
         "push": "push"}
SHARES = (1.0, 0.1, 0.01)  # --shares picks some
HONEST_MIDDLE = {"honest-f32": [], "honest-bf16": ["--dtype", "bfloat16"]}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--rare-sessions", type=int, default=60, help="sessions recorded per cheater at share 1%%")
    parser.add_argument("--honest-sessions", type=int, default=16)
    parser.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.1],
                        help="shares of eligible steps the cheaters corrupt (of 1, 0.1, 0.01; 0.01 needs hours here)")
    parser.add_argument("--repetitions", type=int, default=200)
    parser.add_argument("--audit-fraction", type=float, default=RemoteClientConfig().audit_fraction)
    parser.add_argument("--max-walks", type=int, default=20)
    parser.add_argument("--speed-windows", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def start_swarm(swarm: LocalSwarm, shares) -> dict[str, str]:
    swarm.start_bootstrap()
    servers = {"first": swarm.start_server("0:10", extra=["--no-rebalance"]),
               "last": swarm.start_server("20:30", extra=["--no-rebalance"])}
    for name, extra in HONEST_MIDDLE.items():
        servers[name] = swarm.start_server("10:20", extra=["--no-rebalance", *extra])
    for rule, text in RULES.items():
        for share in shares:
            servers[f"{rule}@{share:g}"] = swarm.start_server(
                "10:20", extra=["--no-rebalance", "--fault", f"noise:0.1;{text};share={share:g}"])
    swarm.wait_until_online(len(servers), timeout=900)
    return {name: peer_id_of(server) for name, server in servers.items()}


def run_session(client, peers, middle, prompt_ids, new_tokens, rows) -> dict:
    """One audited session first -> middle -> last; its steps, seconds and every server's audit verdict."""
    route = [RouteHop(peers["first"], Span(0, 10)), RouteHop(peers[middle], Span(10, 20)),
             RouteHop(peers["last"], Span(20, 30))]
    ids = prompt_ids.repeat(rows, 1)  # [rows, prompt]
    session = RemoteInferenceSession(client, ids.shape[1] + new_tokens, audited=True, batch=rows)
    started = time.perf_counter()
    client.run(session.open_route(route))
    steps = 0
    try:
        step_ids = ids
        for _ in range(new_tokens):
            hidden = session.step(client.parts.embed(step_ids))  # [rows, tokens, hidden]
            step_ids = client.parts.logits(hidden[:, -1:]).argmax(dim=-1)  # [rows, 1]
            steps += 1
    finally:
        before = len(client.audits)
        client.run(session.finish())
        client.wait_for_audits()
    seconds = time.perf_counter() - started
    verdicts = {server: getattr(verdict, "verdict", str(verdict)) for server, verdict in client.audits[before:]}
    return {"steps": steps, "seconds": seconds, "verdicts": verdicts}


def workload(passages, tokenizer, rng: random.Random):
    """An endless stream of (prompt ids [1, T], new tokens, rows) like the module docstring says."""
    while True:
        ids = tokenizer(rng.choice(passages), add_special_tokens=False)["input_ids"]
        length = rng.randint(4, 16)
        start = rng.randrange(max(1, len(ids) - length))
        yield torch.tensor([ids[start:start + length]]), rng.randint(2, 12), 2 if rng.random() < 0.2 else 1


def repetitions(sessions: list[dict], peer: str, args, rng: random.Random) -> dict:
    """Resampled audit draws over one cheater's recorded sessions (see the module docstring)."""
    lies = [record["verdicts"].get(peer) == "lie" for record in sessions]
    found_steps, found_seconds = [], []
    for _ in range(args.repetitions):
        index, steps, seconds = rng.randrange(len(sessions)), 0, 0.0
        for _ in range(args.max_walks * len(sessions)):
            record = sessions[index]
            steps, seconds = steps + record["steps"], seconds + record["seconds"]
            if lies[index] and rng.random() < args.audit_fraction:
                found_steps.append(steps)
                found_seconds.append(seconds)
                break
            index = (index + 1) % len(sessions)
    detected = len(found_steps)

    def percentile(values, share):
        return sorted(values)[min(len(values) - 1, int(share * len(values)))] if values else None

    return {"corrupted_sessions": sum(lies), "sessions": len(sessions),
            "steps_recorded": sum(record["steps"] for record in sessions),
            "detection_rate": detected / args.repetitions,
            "steps_to_deactivation_p50": percentile(found_steps, 0.5),
            "steps_to_deactivation_p99": percentile(found_steps, 0.99),
            "seconds_to_deactivation_p50": round(percentile(found_seconds, 0.5) or 0, 2) if found_seconds else None,
            "seconds_to_deactivation_p99": round(percentile(found_seconds, 0.99) or 0, 2) if found_seconds else None}


def speed(swarm, peers, verifier, windows: int) -> dict:
    config = GenerationConfig(max_new_tokens=24, greedy=True, stop_on_eos=False)
    on = DistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers, RemoteClientConfig(
        trusted_verifier_keys=(verifier.key,), audit_seed=1))
    off = DistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers, RemoteClientConfig(
        trusted_verifier_keys=(verifier.key,), audit_fraction=0.0))
    route = [RouteHop(peers["first"], Span(0, 10)), RouteHop(peers["honest-f32"], Span(10, 20)),
             RouteHop(peers["last"], Span(20, 30))]
    rates = {"on": [], "off": []}
    try:
        ids = on.parts.tokenizer("The history of the city begins", return_tensors="pt")["input_ids"]
        for window in range(2 * windows):
            name, client = ("on", on) if window % 2 == 0 else ("off", off)
            session = RemoteInferenceSession(client, ids.shape[1] + config.max_new_tokens)
            client.run(session.open_route(route))
            started = time.perf_counter()
            new_ids, _, _ = client._decode_loop(session, ids, config, None)
            rates[name].append(len(new_ids) / (time.perf_counter() - started))
            client.run(session.finish())
        on.wait_for_audits()
        client_bytes = on.bytes_sent + on.bytes_received
        return {"tokens_per_s_on": round(statistics.median(rates["on"]), 2),
                "tokens_per_s_off": round(statistics.median(rates["off"]), 2),
                "on_over_off": round(statistics.median(rates["on"]) / statistics.median(rates["off"]), 3),
                "audit_bytes_share_of_client_bytes": round(on.audit_bytes / client_bytes, 3),
                "received_bytes_on_over_off": round(on.bytes_received / max(1, off.bytes_received), 3),
                "audited_sessions": sum(1 for _, verdict in on.audits) // 3}
    finally:
        on.shutdown()
        off.shutdown()


def main() -> None:
    args = parse_args()
    # a timeout's SIGTERM must unwind the swarm's context manager: its servers run in sessions of their own
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    rng = random.Random(args.seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder, LocalSwarm(MODEL) as swarm:
        peers = start_swarm(swarm, args.shares)
        decisions = VerifierConfig(ledger_path=Path(folder) / "ledger.sqlite")
        verifier = Verifier(VerifierNodeConfig(MODEL, tuple(swarm.initial_peers), rounds=1, jitter_s=0.0, seed=args.seed,
                                               torch_threads=1, decisions=decisions)).start()
        client = None
        try:
            verifier.run_round()  # verdicts on every server: the "verdict" cheaters start cheating once they see one
            time.sleep(12)  # servers look for verdicts every announce interval (5 s)
            client = DistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers, RemoteClientConfig(
                trusted_verifier_keys=(verifier.key,), audit_fraction=1.0))
            stream = workload(load_passages(default_corpus_path()), client.parts.tokenizer, rng)
            recorded = {}
            for name in [*HONEST_MIDDLE, *(f"{rule}@{share:g}" for rule in RULES for share in args.shares)]:
                if name.startswith("verdict@"):
                    verifier.run_round()  # fresh verdicts (they live 600 s); the cheater looks every 5 s
                    time.sleep(12)
                count = args.honest_sessions if name in HONEST_MIDDLE else (
                    args.rare_sessions if name.endswith("@0.01") else args.sessions)
                recorded[name] = [run_session(client, peers, name, *next(stream)) for _ in range(count)]
                print(f"{name}: {sum(r['verdicts'].get(peers[name]) == 'lie' for r in recorded[name])} lies "
                      f"in {count} sessions ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
            honest = {peers[name] for name in ("first", "last", *HONEST_MIDDLE)}
            false_lies = sum(verdict == "lie" for sessions in recorded.values() for record in sessions
                             for server, verdict in record["verdicts"].items() if server in honest)
            cheaters = {name: repetitions(recorded[name], peers[name], args, rng)
                        for name in recorded if name not in HONEST_MIDDLE}
            verifier.book_audits()
            clawed = sum(record.work for record in verifier.ledger.clawbacks())
            speeds = speed(swarm, peers, verifier, args.speed_windows)
            result = {
                "benchmark": "adversarial", "model": MODEL, "fault": "noise:0.1;RULE;share=P on blocks 10:20",
                "audit_fraction": args.audit_fraction, "repetitions": args.repetitions,
                "repetition_method": "client audit draws resampled over recorded real sessions (module docstring)",
                "cheaters": cheaters,
                "honest_false_lie_verdicts": false_lies,
                "honest_servers_deactivated": sorted(set(verifier.proven_liars) & honest),
                "cheaters_proven": sum(peers[name] in verifier.proven_liars for name in cheaters),
                "cheaters_total": len(cheaters),
                "work_clawed_back_tokens_x_blocks": clawed,
                **speeds,
                "wall_s": round(time.monotonic() - started, 1),
            }
        finally:
            if client is not None:
                client.shutdown()
            verifier.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
