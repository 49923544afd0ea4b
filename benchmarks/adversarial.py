"""Adaptive cheaters against audits of real traffic, on a real swarm on 127.0.0.1. Prints one JSON line.

Servers: one cheater per adaptive rule and share (``noise:0.1;RULE;share=P``,
:mod:`efedllm.server.faults`; ``--shares`` of 100%, 10% and 1%), each holding its own span of
one chain through the whole model (18 cheaters: 1-2 blocks each), so that every recorded session
is real traffic for every cheater at once. Beside it an honest chain 0:10 -> 10:20 -> 20:30 with
a float32 and a bfloat16 server on 10:20. A verifier runs in this process; it runs a probe round
before the recording and again every ``--probe-every`` seconds, so the ``verdict`` rule's
cheaters have seen a (fresh) verdict and cheat.

Recording: ``--sessions`` client sessions through the cheater chain and ``--honest-sessions``
through the honest chains (alternately through the float32 and the bfloat16 middle), every one
audited by the real verifier (audit fraction 1 while recording): prompts of 4..16 WikiText-2
tokens, 2..12 new tokens, one session in five with 2 batch rows. Every verdict on every server of
every session is real.

Repetitions: a server cannot tell an audited session from another (every session carries
receipts), so for a cheater's fixed corruption pattern the only chance left is the client's
private draw. That draw is resampled over the recorded sessions: each of ``--repetitions``
repetitions starts at a random session, walks the recording cyclically and audits each session
with probability ``--audit-fraction`` (the client default), until an audited session holds a
proven lie by that cheater (deactivation: the verifier publishes the verdict before it answers the
audit) or ``--max-walks`` passes over the recording. Reported per cheater: corrupted sessions
recorded, detection rate, and the 50th/99th percentile of the cheater's client steps and seconds
until deactivation.

Speed: a client with audits on (the default ``audit_fraction``, receipts on every step) and one
with them off generate on the honest float32 chain, one session per window, the two alternating
in this one run. A verifier is a machine of its own in a federation; on this one it shares the
cores, so each "on" window's audit is judged after the window ends and before the next one starts
(``wait_for_audits``): what the windows measure is everything the client and the servers do for
verification (receipts signed and checked, upstream outputs carried and compared, audited bytes
kept), not the verifier's recomputation.
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
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the efedllm CLI does (server/swarm.py): before torch loads

import torch  # noqa: E402

from efedllm.client.config import RemoteClientConfig  # noqa: E402
from efedllm.client.remote import DistributedModelForCausalLM  # noqa: E402
from efedllm.client.routing import RouteHop  # noqa: E402
from efedllm.client.sampling import GenerationConfig  # noqa: E402
from efedllm.client.session import RemoteInferenceSession  # noqa: E402
from efedllm.common.spans import Span  # noqa: E402
from efedllm.server.swarm import LocalSwarm, even_spans, peer_id_of  # noqa: E402
from efedllm.verifier.config import VerifierConfig  # noqa: E402
from efedllm.verifier.node import Verifier, VerifierNodeConfig, default_corpus_path, load_passages  # noqa: E402

MODEL = "smollm2-135m"
BLOCKS = 30
RULES = {"after": "after=4", "longer": "longer=16", "prefill": "prefill=8", "batch": "batch", "verdict": "verdict",
         "push": "push"}
HONEST_MIDDLE = {"honest-f32": [], "honest-bf16": ["--dtype", "bfloat16"]}
PENDING_SESSIONS = 8  # audited sessions whose verdicts may be outstanding before the recording waits for them


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=400, help="sessions recorded through the cheater chain")
    parser.add_argument("--honest-sessions", type=int, default=40)
    parser.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.1, 0.01],
                        help="shares of eligible steps the cheaters corrupt")
    parser.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES), help="the cheaters' rules")
    parser.add_argument("--copies", type=int, default=1, help="cheaters per rule and share, each drawing its own "
                        "steps (--fault-seed): more corrupted sessions recorded per session; their figures are pooled")
    parser.add_argument("--repetitions", type=int, default=200, help="per cheater (copy)")
    parser.add_argument("--audit-fraction", type=float, default=RemoteClientConfig().audit_fraction)
    parser.add_argument("--max-walks", type=int, default=20)
    parser.add_argument("--probe-every", type=float, default=300.0, help="seconds between probe rounds (verdicts live 600)")
    parser.add_argument("--speed-windows", type=int, default=20, help="windows of each variant (0: no speed windows)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def cheater_names(args) -> list[str]:
    """The chain's cheaters in the order of their spans: rules interleaved, each share in turn (``#k``: copy k)."""
    names = [f"{rule}@{share:g}" for share in args.shares for rule in args.rules]
    return names if args.copies == 1 else [f"{name}#{copy}" for copy in range(args.copies) for name in names]


def start_swarm(swarm: LocalSwarm, args) -> tuple[dict[str, str], list[RouteHop]]:
    swarm.start_bootstrap()
    servers = {"first": swarm.start_server("0:10", extra=["--no-rebalance"]),
               "last": swarm.start_server("20:30", extra=["--no-rebalance"])}
    for name, extra in HONEST_MIDDLE.items():
        servers[name] = swarm.start_server("10:20", extra=["--no-rebalance", *extra])
    names = cheater_names(args)
    spans = even_spans(BLOCKS, len(names))
    for seed, (name, span) in enumerate(zip(names, spans)):
        share = group_of(name).split("@")[1]
        servers[name] = swarm.start_server(str(span), extra=["--no-rebalance", "--fault-seed", str(seed), "--fault",
                                                             f"noise:0.1;{RULES[rule_of(name)]};share={share}"])
    swarm.wait_until_online(len(servers), timeout=900)
    peers = {name: peer_id_of(server) for name, server in servers.items()}
    return peers, [RouteHop(peers[name], span) for name, span in zip(names, spans)]


def honest_route(peers, middle: str) -> list[RouteHop]:
    return [RouteHop(peers["first"], Span(0, 10)), RouteHop(peers[middle], Span(10, 20)),
            RouteHop(peers["last"], Span(20, 30))]


def run_session(client, route, prompt_ids, new_tokens, rows) -> dict:
    """One audited session on ``route``: its steps, seconds and each hop's session id (verdicts come later)."""
    ids = prompt_ids.repeat(rows, 1)  # [rows, prompt]
    session = RemoteInferenceSession(client, ids.shape[1] + new_tokens, audited=True, batch=rows)
    started = time.perf_counter()
    steps, error = 0, None
    try:
        client.run(session.open_route(route))
        step_ids = ids
        for _ in range(new_tokens):
            hidden = session.step(client.parts.embed(step_ids))  # [rows, tokens, hidden]
            step_ids = client.parts.logits(hidden[:, -1:]).argmax(dim=-1)  # [rows, 1]
            steps += 1
    except Exception as failure:  # reported, not fatal: the recording goes on
        error = f"{type(failure).__name__}: {failure}"
    finally:
        seconds = time.perf_counter() - started
        traces = session.audit.traces if session.audit is not None else {}
        client.run(session.finish())
    hops = {session_id: trace.peer_id for session_id, trace in traces.items() if trace.steps}
    return {"steps": steps, "seconds": seconds, "hops": hops, "error": error, "prompt": ids.shape[1], "rows": rows,
            "max_length": ids.shape[1] + new_tokens}


def eligible_steps(rule: str, record: dict) -> int:
    """How many of a recorded session's steps ``rule`` lets its cheater corrupt (RULES' thresholds; every
    recorded step came by push, and after the first probe round, so after a verdict)."""
    steps = record["steps"]
    return {"after": max(0, steps - 4), "longer": steps if record["max_length"] > 16 else 0,
            "prefill": int(steps > 0 and record["prompt"] > 8), "batch": steps if record["rows"] > 1 else 0,
            "verdict": steps, "push": steps}[rule]


def attach_verdicts(records: list[dict], audits) -> None:
    """Each recorded session's verdict per server, from the client's audit records (matched by session id)."""
    by_session = {audit.session_id: getattr(audit.verdict, "verdict", str(audit.verdict)) for audit in audits}
    for record in records:
        record["verdicts"] = {peer: by_session.get(session_id, "missing") for session_id, peer in record["hops"].items()}


def workload(passages, tokenizer, rng: random.Random):
    """An endless stream of (prompt ids [1, T], new tokens, rows) like the module docstring says."""
    while True:
        ids = tokenizer(rng.choice(passages), add_special_tokens=False)["input_ids"]
        length = rng.randint(4, 16)
        start = rng.randrange(max(1, len(ids) - length))
        yield torch.tensor([ids[start:start + length]]), rng.randint(2, 12), 2 if rng.random() < 0.2 else 1


def record(client, verifier, peers, chain, args, rng, started) -> tuple[list[dict], list[dict]]:
    """The cheater chain's and the honest chains' recorded sessions, interleaved in time."""
    stream = workload(load_passages(default_corpus_path()), client.parts.tokenizer, rng)
    cheated, honest, last_probe = [], [], -float("inf")
    honest_every = max(1, args.sessions // max(1, args.honest_sessions))
    for index in range(args.sessions):
        if "verdict" in args.rules and time.monotonic() - last_probe > args.probe_every:
            verifier.run_round()  # fresh verdicts: the "verdict" cheaters look for them every announce interval
            time.sleep(12)
            last_probe = time.monotonic()
        cheated.append(run_session(client, chain, *next(stream)))
        if index % honest_every == 0 and len(honest) < args.honest_sessions:
            middle = list(HONEST_MIDDLE)[len(honest) % len(HONEST_MIDDLE)]
            honest.append(run_session(client, honest_route(peers, middle), *next(stream)))
        if index % PENDING_SESSIONS == PENDING_SESSIONS - 1:
            client.wait_for_audits(timeout=600)
        if index % 50 == 49:
            print(f"{index + 1} sessions ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    client.wait_for_audits(timeout=600)
    attach_verdicts(cheated + honest, client.audits)
    return cheated, honest


def walks(sessions: list[dict], name: str, peer: str, args, rng: random.Random) -> dict:
    """Resampled audit draws over the recorded sessions for one cheater (see the module docstring): per
    repetition that found the cheater, its client steps, eligible steps and seconds until then."""
    lies = [record["verdicts"].get(peer) == "lie" for record in sessions]
    eligible = [eligible_steps(rule_of(name), record) for record in sessions]
    found = {"steps": [], "eligible": [], "seconds": []}
    for _ in range(args.repetitions):
        index, steps, eligible_so_far, seconds = rng.randrange(len(sessions)), 0, 0, 0.0
        for _ in range(args.max_walks * len(sessions)):
            record = sessions[index]
            steps, seconds = steps + record["steps"], seconds + record["seconds"]
            eligible_so_far += eligible[index]
            if lies[index] and rng.random() < args.audit_fraction:
                for key, value in (("steps", steps), ("eligible", eligible_so_far), ("seconds", seconds)):
                    found[key].append(value)
                break
            index = (index + 1) % len(sessions)
    return {"corrupted_sessions": sum(lies), "sessions": len(sessions), "repetitions": args.repetitions,
            "steps_recorded": sum(record["steps"] for record in sessions), "eligible_steps_recorded": sum(eligible),
            **found}


def rule_of(name: str) -> str:
    return name.split("@")[0]


def group_of(name: str) -> str:
    return name.split("#")[0]  # "prefill@0.01#2" -> "prefill@0.01": copies of one cheater


def summarise(records: list[dict]) -> dict:
    """One cheater's (or, pooled, its copies') detection figures from :func:`walks` records."""
    found = {key: [value for record in records for value in record[key]] for key in ("steps", "eligible", "seconds")}
    repetitions = sum(record["repetitions"] for record in records)

    def percentile(values, share):
        return sorted(values)[min(len(values) - 1, int(share * len(values)))] if values else None

    def rounded(value):
        return None if value is None else round(value, 1)

    return {"copies": len(records), "corrupted_sessions": sum(record["corrupted_sessions"] for record in records),
            "sessions": records[0]["sessions"], "steps_recorded": records[0]["steps_recorded"],
            "eligible_steps_recorded": records[0]["eligible_steps_recorded"], "repetitions": repetitions,
            "detection_rate": len(found["steps"]) / repetitions,
            "steps_to_deactivation_p50": percentile(found["steps"], 0.5),
            "steps_to_deactivation_p99": percentile(found["steps"], 0.99),
            "eligible_steps_to_deactivation_p99": percentile(found["eligible"], 0.99),
            "seconds_to_deactivation_p50": rounded(percentile(found["seconds"], 0.5)),
            "seconds_to_deactivation_p99": rounded(percentile(found["seconds"], 0.99))}


def speed(swarm, peers, verifier, windows: int) -> dict:
    """Alternating one-session windows with verification on and off (see the module docstring)."""
    if windows == 0:
        return {}
    config = GenerationConfig(max_new_tokens=24, greedy=True, stop_on_eos=False)
    on = DistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers, RemoteClientConfig(
        trusted_verifier_keys=(verifier.key,), audit_seed=1))
    off = DistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers, RemoteClientConfig(
        trusted_verifier_keys=(verifier.key,), audit_fraction=0.0))
    route = honest_route(peers, "honest-f32")
    rates, audited = {"on": [], "off": []}, 0
    try:
        ids = on.parts.tokenizer("The history of the city begins", return_tensors="pt")["input_ids"]
        for window in range(2 * windows):
            name, client = ("on", on) if window % 2 == 0 else ("off", off)
            session = RemoteInferenceSession(client, ids.shape[1] + config.max_new_tokens)
            started = time.perf_counter()
            client.run(session.open_route(route))
            new_ids = client._decode_loop(session, ids, config, None)[0].new_ids
            rates[name].append(len(new_ids) / (time.perf_counter() - started))
            audited += session.audit is not None
            client.run(session.finish())
            client.wait_for_audits()  # the verifier's recomputation stays out of the timed windows
        client_bytes = on.bytes_sent + on.bytes_received
        return {"tokens_per_s_on": round(statistics.median(rates["on"]), 2),
                "tokens_per_s_off": round(statistics.median(rates["off"]), 2),
                "on_over_off": round(statistics.median(rates["on"]) / statistics.median(rates["off"]), 3),
                "speed_windows_each": windows, "speed_audited_sessions": audited,
                "audit_bytes_share_of_client_bytes": round(on.audit_bytes / client_bytes, 3),
                "received_bytes_on_over_off": round(on.bytes_received / max(1, off.bytes_received), 3),
                "speed_servers_banned": sorted(on.view.bans.ever | off.view.bans.ever)}
    finally:
        on.shutdown()
        off.shutdown()


def summary(cheated, honest, peers, verifier, client, args, rng) -> dict:
    honest_peers = {peers[name] for name in ("first", "last", *HONEST_MIDDLE)}
    verdicts = [(server, verdict) for record in cheated + honest for server, verdict in record["verdicts"].items()]
    walked = {name: walks(cheated, name, peers[name], args, rng) for name in cheater_names(args)}
    groups = {group_of(name): [] for name in walked}
    for name, record in walked.items():
        groups[group_of(name)].append(record)
    cheaters = {group: summarise(records) for group, records in groups.items()}
    verifier.book_audits()
    return {
        "cheaters": cheaters,
        "sessions_failed": sum(record["error"] is not None for record in cheated + honest),
        "verdicts_missing": sum(verdict not in ("clean", "lie", "invalid") for _, verdict in verdicts),
        "honest_sessions": len(honest),
        "honest_false_lie_verdicts": sum(verdict == "lie" for server, verdict in verdicts if server in honest_peers),
        "honest_servers_deactivated": sorted(set(verifier.proven_liars) & honest_peers),
        "honest_servers_banned": sorted(client.view.bans.ever & honest_peers),
        "cheaters_proven": sum(peers[name] in verifier.proven_liars for name in walked),
        "cheaters_total": len(walked),
        "work_clawed_back_tokens_x_blocks": sum(clawback.work for clawback in verifier.ledger.clawbacks()),
    }


def main() -> None:
    args = parse_args()
    # a timeout's SIGTERM must unwind the swarm's context manager: its servers run in sessions of their own
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    rng = random.Random(args.seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder, LocalSwarm(MODEL) as swarm:
        peers, chain = start_swarm(swarm, args)
        print(f"{len(peers)} servers online ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        decisions = VerifierConfig(ledger_path=Path(folder) / "ledger.sqlite")
        verifier = Verifier(VerifierNodeConfig(MODEL, tuple(swarm.initial_peers), rounds=1, jitter_s=0.0, seed=args.seed,
                                               torch_threads=1, decisions=decisions)).start()
        client = None
        try:
            client = DistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers, RemoteClientConfig(
                trusted_verifier_keys=(verifier.key,), audit_fraction=1.0))
            cheated, honest = record(client, verifier, peers, chain, args, rng, started)
            result = {"benchmark": "adversarial", "model": MODEL, "fault": "noise:0.1;RULE;share=P",
                      "chain_spans": [str(hop.blocks) for hop in chain], "audit_fraction": args.audit_fraction,
                      "repetitions": args.repetitions,
                      "repetition_method": "client audit draws resampled over recorded real sessions (module docstring)",
                      **summary(cheated, honest, peers, verifier, client, args, rng),
                      **speed(swarm, peers, verifier, args.speed_windows),
                      "wall_s": round(time.monotonic() - started, 1)}
        finally:
            if client is not None:
                client.shutdown()
            verifier.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
