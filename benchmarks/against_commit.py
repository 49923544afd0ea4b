"""This checkout against an earlier commit, in one run: ``benchmarks/swarm_vs_local.py`` of each, in turn.

The baseline's tree is exported with ``git archive`` into a temporary folder and run with
``PYTHONPATH`` pointing at its ``src`` (its servers, started by its own ``LocalSwarm``, inherit it), so
both use this environment's packages. Rounds alternate baseline, current, baseline, current, ... so
that the machine's drift hits both alike; each run is the benchmark's own (its best of ``--repeats``
interleaved rounds against the faster local configuration of the same run). Each tree also generates
64 greedy tokens locally (``efedllm generate --local --greedy --json``): the token ids must agree.

Prints one JSON line: per tree, every round's chained and relayed tokens/s and their ratio to local,
the median of the chained ratio, and whether every run gave the same tokens as local.

Usage: python benchmarks/against_commit.py [--baseline REV] [--rounds N] [--repeats N] [--step-pairs N]
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
PROMPT = "Write a short story about a lighthouse keeper."
KEYS = ("chained_tokens_per_s", "relayed_tokens_per_s", "local_tokens_per_s", "chained_over_local", "relayed_over_local",
        "same_tokens_as_local")


def export_tree(revision: str, into: Path) -> Path:
    """``git archive revision`` unpacked into ``into``; returns that folder."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", revision], check=True, capture_output=True).stdout
    archive_path = into / "tree.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def environment(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree / "src"), "HF_HUB_OFFLINE": "1"}


def run_json(command: list[str], tree: Path) -> dict:
    done = subprocess.run(command, cwd=tree, env=environment(tree), capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def local_tokens(tree: Path) -> list[int]:
    command = [sys.executable, "-m", "efedllm.cli", "generate", "--local", "--greedy", "--json", "--max-new-tokens", "64", PROMPT]
    return run_json(command, tree)["token_ids"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="e5ae2ca", help="the commit to compare with (default: main before issue 14)")
    counts = {"--rounds": (3, "benchmark runs per tree, alternating"), "--repeats": (4, "swarm_vs_local.py --repeats per run"),
              "--step-pairs": (30, "swarm_vs_local.py --step-pairs per run")}
    for flag, (default, meaning) in counts.items():
        parser.add_argument(flag, type=int, default=default, help=meaning)
    args = parser.parse_args()
    if min(args.rounds, args.repeats, args.step_pairs) < 1:
        parser.error("--rounds, --repeats and --step-pairs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="efedllm-baseline-") as folder:
        trees = {"baseline": export_tree(args.baseline, Path(folder)), "current": ROOT}
        benchmark = ["--skip-perplexity", "--repeats", str(args.repeats), "--step-pairs", str(args.step_pairs)]
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                result = run_json([sys.executable, str(tree / "benchmarks" / "swarm_vs_local.py"), *benchmark], tree)
                runs[name].append({key: result[key] for key in KEYS})
        tokens = {name: local_tokens(tree) for name, tree in trees.items()}
    medians = {name: statistics.median(run["chained_over_local"] for run in results) for name, results in runs.items()}
    print(json.dumps({
        "benchmark": "against_commit", "baseline": args.baseline, "rounds": args.rounds, "repeats": args.repeats,
        "runs": runs, "median_chained_over_local": medians,
        "median_chained_tokens_per_s": {name: statistics.median(run["chained_tokens_per_s"] for run in results)
                                        for name, results in runs.items()},
        "current_over_baseline_chained_over_local": round(medians["current"] / medians["baseline"], 3),
        "same_tokens_as_local_in_every_run": all(run["same_tokens_as_local"] for results in runs.values() for run in results),
        "same_local_tokens_in_both_trees": tokens["baseline"] == tokens["current"],
    }))


if __name__ == "__main__":
    main()
