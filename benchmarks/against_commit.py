"""This checkout against an earlier commit, in one run: the same 3-server chained swarm of each, generation by
generation in turn, against the local pipeline measured in the same rounds.

The baseline's tree is exported with ``git archive`` into a temporary folder. Each tree runs in a worker
process of its own (this file with ``--worker``, ``PYTHONPATH`` pointing at that tree's ``src``; its
servers, started by its own ``LocalSwarm``, inherit it), with everything ``benchmarks/swarm_vs_local.py``
measures for its chained mode: three servers of 10 blocks at 1 torch thread, a client at 1 thread, 64 greedy
tokens. Both swarms stay up; each round generates once through each (in alternating order) and once locally
with 1 and with 2 threads. A round lasts ~20 s, so the machine's drift, which moves whole benchmark runs by
10-25% here, hits both trees alike; the per-round ratio current / baseline is the figure.

Prints one JSON line: every round's tokens/s per tree and locally, the medians, the median per-round ratio
current / baseline, chained / local (local the faster thread count of each round), and whether every
generation of both trees gave the local pipeline's tokens.

Usage: python benchmarks/against_commit.py [--baseline REV] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL, TOKENS, PROMPT = "smollm2-135m", 64, "Write a short story about a lighthouse keeper."


def export_tree(revision: str, into: Path) -> Path:
    """``git archive revision`` unpacked into ``into``; returns that folder."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", revision], check=True, capture_output=True).stdout
    (into / "tree.tar").write_bytes(archive)
    with tarfile.open(into / "tree.tar") as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


class Worker:
    """One tree's swarm, client and local pipeline in a process of its own, generating on request."""

    def __init__(self, tree: Path) -> None:
        environment = {**os.environ, "PYTHONPATH": str(tree / "src"), "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen([sys.executable, __file__, "--worker"], cwd=tree, env=environment, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ready = json.loads(self.process.stdout.readline())

    def generate(self, where: str) -> dict:
        self.process.stdin.write(where + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)


def run_worker() -> None:
    """Inside one tree: start its swarm, answer "swarm", "local1" or "local2" with one generation's JSON."""
    # imported here, in the worker, from whichever tree PYTHONPATH names: the driver runs neither tree's code
    import torch

    from efedllm.client.local import LocalModelForCausalLM
    from efedllm.client.remote import DistributedModelForCausalLM
    from efedllm.client.sampling import GenerationConfig
    from efedllm.server.swarm import LocalSwarm

    config = GenerationConfig(max_new_tokens=TOKENS, greedy=True, stop_on_eos=False)
    local = LocalModelForCausalLM.load(MODEL)
    input_ids = local.encode_prompt(PROMPT)
    with LocalSwarm(MODEL) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:10", "10:20", "20:30"):
            swarm.start_server(blocks, extra=["--no-rebalance", "--torch-threads", "1"])
        swarm.wait_until_online(3)
        client = DistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers)
        try:
            models = {"swarm": (client, 1), "local1": (local, 1), "local2": (local, 2)}
            for model, threads in models.values():
                torch.set_num_threads(threads)
                model.generate(input_ids, config)  # warm-up
            print(json.dumps({"ready": True}), flush=True)
            for line in sys.stdin:
                model, threads = models[line.strip()]
                torch.set_num_threads(threads)
                result = model.generate(input_ids, config)
                print(json.dumps({"tokens_per_s": result.tokens_per_s, "token_ids": result.token_ids}), flush=True)
        finally:
            client.shutdown()


def measure(workers: dict[str, Worker], rounds: int) -> dict:
    names = list(workers)
    runs = {name: [] for name in names} | {"local": []}
    tokens = set()
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            result = workers[name].generate("swarm")
            runs[name].append(result["tokens_per_s"])
            tokens.add(tuple(result["token_ids"]))
        local = [workers["current"].generate(where) for where in ("local1", "local2")]
        runs["local"].append(max(result["tokens_per_s"] for result in local))
        tokens.update(tuple(result["token_ids"]) for result in local)
    return {"runs": runs, "same_tokens_everywhere": len(tokens) == 1}


def summary(runs: dict[str, list[float]]) -> dict:
    ratios = [current / baseline for current, baseline in zip(runs["current"], runs["baseline"])]
    return {
        "median_tokens_per_s": {name: round(statistics.median(values), 2) for name, values in runs.items()},
        "median_round_ratio_current_over_baseline": round(statistics.median(ratios), 3),
        "rounds_current_faster": sum(ratio > 1 for ratio in ratios),
        "median_chained_over_local": {name: round(statistics.median(value / local for value, local in
                                                                    zip(runs[name], runs["local"])), 3)
                                      for name in ("baseline", "current")},
        "tokens_per_s_by_round": {name: [round(value, 2) for value in values] for name, values in runs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="e5ae2ca", help="the commit to compare with (default: main before issue 14)")
    parser.add_argument("--rounds", type=int, default=12, help="rounds of one generation per tree and the local ones")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    with tempfile.TemporaryDirectory(prefix="efedllm-baseline-") as folder:
        workers = {}
        try:
            for name, tree in (("baseline", export_tree(args.baseline, Path(folder))), ("current", ROOT)):
                workers[name] = Worker(tree)
            measured = measure(workers, args.rounds)
        finally:
            for worker in workers.values():
                worker.close()
    print(json.dumps({"benchmark": "against_commit", "baseline": args.baseline, "rounds": args.rounds, "new_tokens": TOKENS,
                      "same_tokens_everywhere": measured["same_tokens_everywhere"], **summary(measured["runs"])}))


if __name__ == "__main__":
    main()
