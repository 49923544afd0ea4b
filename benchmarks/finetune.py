"""Fine-tuning through the swarm against the same training in this process, measured in the same run. Prints
one JSON line.

LoRA (rank 8, alpha 16, q/k/v/o of every block) on SmolLM2-135M with WikiText-2: the first 80% of
``../shared/data/wikitext2-test.raw`` (by characters) is the training text, the last 20% is held out. The swarm is
3 servers x 10 blocks on 127.0.0.1, each with every core's torch thread (``--server-threads``: a training chain
computes on one server at a time, so each gets the machine as if it were its own); the local model runs the same
3 spans in this process at its best thread count (1 or 2, timed here). Both start from the same seeded adapter and take the same
batches, one step each in turn (their timings alternate); measured: training tokens/s of each, their ratio,
the losses of both (they must agree), held-out perplexity before and after, and bytes on the wire per step.

Then the detection of backward faults (issue 19's point 4), in a second swarm with a verifier: blocks 10:20 on an
honest server and on one server per fault mode (``grad-noise:0.05``, ``grad-zeros``, ``grad-stale``). Each
repetition trains 2 steps (batch 2 x 32 tokens of the training text, a fresh adapter) through first ->
X -> last with every training answer audited (``train_audit_fraction`` 1.0); a mode is detected in a
repetition when the verifier proves X's answer a lie and the step is redone elsewhere, and the repetition's
losses are compared with the same steps run locally. With the honest server as X nobody may be flagged.

Usage: python benchmarks/finetune.py [--steps N] [--batch B] [--seq-len L] [--lr X] [--eval-chunks K]
       [--repetitions R] [--server-threads T] [--plot finetune.loss.png]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the efedllm CLI does (server/swarm.py): before torch loads

import torch  # noqa: E402

from efedllm.cli.finetune import plot_losses  # noqa: E402
from efedllm.client.config import RemoteClientConfig  # noqa: E402
from efedllm.client.finetune import batches, perplexity, token_chunks  # noqa: E402
from efedllm.client.local import LocalModelForCausalLM  # noqa: E402
from efedllm.client.remote import DistributedModelForCausalLM  # noqa: E402
from efedllm.common.spans import parse_spans  # noqa: E402
from efedllm.models.adapters import AdapterSpec  # noqa: E402
from efedllm.client.routing import RouteHop  # noqa: E402
from efedllm.common.spans import Span  # noqa: E402
from efedllm.server.swarm import LocalSwarm, machine_cores, peer_id_of  # noqa: E402
from efedllm.verifier.config import VerifierConfig  # noqa: E402
from efedllm.verifier.node import Verifier, VerifierNodeConfig  # noqa: E402

MODEL = "smollm2-135m"
TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2-test.raw"


def split_text(path: Path) -> tuple[str, str]:
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.8)
    return text[:cut], text[cut:]


def step(model, optimizer, rows: torch.Tensor) -> tuple[float, float]:
    """(loss, seconds) of one AdamW step with clipping."""
    started = time.perf_counter()
    optimizer.zero_grad()
    loss = model(rows, labels=rows).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item(), time.perf_counter() - started


def best_threads(local: LocalModelForCausalLM, spec: AdapterSpec, rows: torch.Tensor) -> int:
    """The faster of 1 and 2 torch threads for a training step here (each timed twice, alternating)."""
    model, seconds = local.trainable(spec, seed=1), {1: [], 2: []}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        seconds[threads].append(step(model, optimizer, rows)[1])
    return min(seconds, key=lambda threads: min(seconds[threads]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-chunks", type=int, default=16)
    parser.add_argument("--repetitions", type=int, default=20, help="per backward fault mode (0: skip the detection)")
    parser.add_argument("--plot", type=Path, default=Path("finetune.loss.png"),
                        help="the swarm's loss curve with the held-out perplexity before and after (PNG)")
    parser.add_argument("--server-threads", type=int, default=machine_cores(),
                        help="torch threads per server (default: every core; a training chain computes on one "
                             "server at a time, as if each were its own machine)")
    args = parser.parse_args()
    spec = AdapterSpec("lora", rank=8, alpha=16.0)
    local = LocalModelForCausalLM.load(MODEL, parse_spans("0:10,10:20,20:30"))
    tokenizer = local.parts.tokenizer
    training_text, held_out_text = split_text(TEXT)
    chunks = token_chunks(tokenizer(training_text)["input_ids"], args.seq_len)
    held_out = token_chunks(tokenizer(held_out_text)["input_ids"], args.seq_len)[:args.eval_chunks]
    threads = best_threads(local, spec, chunks[:args.batch])
    output = {"model": MODEL, "method": "lora", "rank": 8, "alpha": 16.0, "text": str(TEXT),
              "training_text": "first 80% of the file (by characters)", "held_out_text": "last 20% of the file",
              "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
              "held_out_tokens": held_out.numel(), "local_threads": threads, "server_threads": args.server_threads}
    with LocalSwarm(MODEL) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:10", "10:20", "20:30"):
            swarm.start_server(blocks, extra=["--no-rebalance", "--torch-threads", str(args.server_threads)])
        swarm.wait_until_online(3)
        client = DistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=swarm.initial_peers)
        try:
            output.update(compare(local, client, spec, chunks, held_out, args, threads))
            output["loss_curve"] = str(args.plot.resolve())
        finally:
            client.shutdown()
    if args.repetitions > 0:
        output["backward_fault_detection"] = detect_faults(local, token_chunks(tokenizer(training_text)["input_ids"], 32),
                                                           args.repetitions)
    print(json.dumps(output))


FAULTS = {"honest": None, "grad-noise:0.05": "grad-noise:0.05", "grad-zeros": "grad-zeros", "grad-stale": "grad-stale"}


def detect_faults(local, chunks: torch.Tensor, repetitions: int) -> dict:
    """Per fault mode: repetitions in which the verifier proved the middle server a lie, servers flagged
    that were honest, and the largest loss difference from local training (the redone steps' effect)."""
    with tempfile.TemporaryDirectory() as ledger, LocalSwarm(MODEL) as swarm:
        swarm.start_bootstrap()
        servers = {"first": swarm.start_server("0:10", extra=["--no-rebalance"]),
                   "last": swarm.start_server("20:30", extra=["--no-rebalance"])}
        for name, fault in FAULTS.items():
            servers[name] = swarm.start_server("10:20", extra=["--no-rebalance"] + (["--fault", fault] if fault else []))
        swarm.wait_until_online(len(servers))
        peers = {name: peer_id_of(server) for name, server in servers.items()}
        verifier = Verifier(VerifierNodeConfig(MODEL, tuple(swarm.initial_peers), rounds=1,
                                               decisions=VerifierConfig(ledger_path=Path(ledger) / "ledger.sqlite")))
        verifier.start()
        config = RemoteClientConfig(trusted_verifier_keys=(verifier.key,), train_audit_fraction=1.0)
        client = DistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers, config)
        try:
            results = {mode: _repetitions(local, client, peers, mode, chunks, repetitions) for mode in FAULTS}
        finally:
            client.shutdown()
            verifier.shutdown()
        honest = {peers[name] for name in ("first", "last", "honest")}
        results["honest_servers_proven_liars"] = len(honest & set(verifier.proven_liars))
    return results


def _repetitions(local, client, peers: dict, mode: str, chunks: torch.Tensor, repetitions: int) -> dict:
    route = [RouteHop(peers["first"], Span(0, 10)), RouteHop(peers[mode], Span(10, 20)), RouteHop(peers["last"], Span(20, 30))]
    spec, detected, flagged, differences, started = AdapterSpec("lora", rank=8, alpha=16.0), 0, 0, [], time.perf_counter()
    for repetition in range(repetitions):
        models = {"swarm": client.trainable(spec, seed=repetition, attempts=6, route=route),
                  "local": local.trainable(spec, seed=repetition)}
        losses = {name: [] for name in models}
        for name, model in models.items():
            optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
            for rows in batches(chunks, 2, 2, seed=repetition):
                losses[name].append(step(model, optimizer, rows)[0])
        liars = {peer for runner in models["swarm"].runners for peer in runner.liars}
        detected += peers[mode] in liars
        flagged += len(liars & {peers["first"], peers["last"], peers["honest"]})
        differences.append(max(abs(a - b) / abs(b) for a, b in zip(losses["swarm"], losses["local"])))
    return {"repetitions": repetitions, "detected": detected if mode != "honest" else None,
            "detection_rate": round(detected / repetitions, 3) if mode != "honest" else None,
            "honest_servers_flagged": flagged, "max_loss_relative_difference_vs_local": max(differences),
            "seconds": round(time.perf_counter() - started, 1)}


def compare(local, client, spec, chunks, held_out, args, threads: int) -> dict:
    models = {"local": local.trainable(spec, seed=0), "swarm": client.trainable(spec, seed=0)}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=args.lr) for name, model in models.items()}
    torch.set_num_threads(threads)
    before = perplexity(models["local"], held_out, args.batch)
    losses, seconds = {"local": [], "swarm": []}, {"local": 0.0, "swarm": 0.0}
    started = time.perf_counter()
    for index, rows in enumerate(batches(chunks, args.batch, args.steps, seed=0)):
        order = ("local", "swarm") if index % 2 == 0 else ("swarm", "local")
        for name in order:
            loss, took = step(models[name], optimizers[name], rows)
            losses[name].append(loss)
            seconds[name] += took
    training_seconds = time.perf_counter() - started
    wire = sum(runner.bytes_sent + runner.bytes_received for runner in models["swarm"].runners)  # training steps only
    after = {name: perplexity(model, held_out, args.batch) for name, model in models.items()}
    plot_losses(args.plot, losses["swarm"], [(0, before), (args.steps, after["swarm"])])
    tokens = args.steps * args.batch * args.seq_len
    return {
        "local_tokens_per_s": round(tokens / seconds["local"], 2), "swarm_tokens_per_s": round(tokens / seconds["swarm"], 2),
        "swarm_over_local": round(seconds["local"] / seconds["swarm"], 3),
        "wall_seconds_training_both": round(training_seconds, 1),
        "first_loss": round(losses["swarm"][0], 4), "last_loss": round(losses["swarm"][-1], 4),
        "max_loss_relative_difference_swarm_vs_local": max(abs(a - b) / abs(b) for a, b in zip(losses["swarm"], losses["local"])),
        "held_out_perplexity_before": round(before, 3),
        "held_out_perplexity_after": {name: round(value, 3) for name, value in after.items()},
        "held_out_perplexity_fall": round(1 - after["swarm"] / before, 3),
        "wire_bytes_per_training_step": round(wire / args.steps),
        "replays": sum(runner.replays for runner in models["swarm"].runners),
    }


if __name__ == "__main__":
    main()
