"""A 3-server swarm on 127.0.0.1 vs the local pipeline: tokens/s for 64 greedy tokens, time to
first token, bytes per token per hop for each wire format, and each server's peak RSS. Prints one
JSON line.

Swarm modes: ``chained`` (the default: each server forwards to the next, the last delivers to the
client), ``chained_answer_along_chain`` (the answer returns hop by hop, the paper's plain chain) and
``relayed`` (the client sends every hop, Petals' way).

Each server computes with ``--server-threads`` torch threads (default 1; ``efedllm serve --torch-threads``,
which otherwise leaves torch's own count, every core).
The local baseline is the faster of 1 thread and this machine's cores, measured in the same rounds, so
that no thread count favours the swarm. Why 1 per server: a decode step is memory-bound, and in a
chain of processes on shared cores a second OpenMP thread costs more than it gives. Measured with
three processes of 10 blocks passing one token along (decode step of 10 blocks, median): 1 thread
15.4 ms, 2 threads with ``OMP_WAIT_POLICY=PASSIVE`` 16.2 ms (each parallel region wakes a sleeping
worker), 2 threads with the default policy 19.9 ms (the idle servers' spinning workers take the
cores of the one computing). The local pipeline runs as fast with 1 thread as with 2 (16.7-17.8
vs 16.0-16.8 tokens/s), and the swarm's client computes with ``--client-threads`` (default 1) for the
same reason: its idle workers would spin on the cores the first server needs.

Each mode runs once per round, in turn, for ``--repeats`` rounds (default 8; it was 4, but single
runs drift by several percent from minute to minute here); its best round counts, and every round's
tokens/s is printed too. ``decode_steps_in_turn``: in one session, a chained and a relayed decode
step taken in turn (``--step-pairs`` pairs), their median times and how many pairs the chained step
won; pairs ~0.15 s apart do not feel the drift that whole generations do.

Usage: python benchmarks/swarm_vs_local.py [--skip-perplexity] [--repeats N] [--step-pairs N] [--server-threads N] [--client-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the efedllm CLI does (server/swarm.py): before torch loads

import torch  # noqa: E402

from efedllm.client.config import RemoteClientConfig  # noqa: E402
from efedllm.client.local import LocalModelForCausalLM  # noqa: E402
from efedllm.client.remote import DistributedModelForCausalLM  # noqa: E402
from efedllm.client.sampling import GenerationConfig  # noqa: E402
from efedllm.common.spans import parse_spans  # noqa: E402
from efedllm.protocol import codec  # noqa: E402
from efedllm.server.swarm import LocalSwarm  # noqa: E402

MODEL, TOKENS = "smollm2-135m", 64
PROMPT = "Write a short story about a lighthouse keeper."
CONFIG = GenerationConfig(max_new_tokens=TOKENS, greedy=True, stop_on_eos=False)


@contextmanager
def torch_threads(threads: int):
    """Runs the block with ``threads`` torch threads in this process, then restores the count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class WithThreads:
    """A model whose generate() runs with ``threads`` torch threads in this process."""

    def __init__(self, model, threads: int) -> None:
        self.model, self.threads = model, threads

    def generate(self, input_ids, config):
        with torch_threads(self.threads):
            return self.model.generate(input_ids, config)


def measure_interleaved(models: dict, input_ids, repeats: int) -> dict:
    """Best run of each model over ``repeats`` rounds, one run of each per round (the machine's speed
    drifts), and every round's tokens/s."""
    for model in models.values():
        model.generate(input_ids, CONFIG)  # warm-up
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(model.generate(input_ids, CONFIG))
    best = {name: max(results, key=lambda result: result.tokens_per_s) for name, results in runs.items()}
    return {name: {"tokens_per_s": round(result.tokens_per_s, 2), "time_to_first_token_s": round(result.time_to_first_token, 4),
                   "token_ids": result.token_ids, "rounds": [round(run.tokens_per_s, 2) for run in runs[name]]}
            for name, result in best.items()}


def alternating_steps(model, input_ids, token_ids: list[int], pairs: int, threads: int) -> dict:
    """A chained and a relayed decode step in turn, ``pairs`` times, in one session of ``model``: a pair
    is ~0.15 s apart, so the machine's drift, which swamps whole-generation comparisons here, cancels.
    The LM head runs between steps, as in generation, and is not timed."""
    times = {"chained": [], "relayed": []}
    with torch_threads(threads), model.inference_session(max_length=input_ids.shape[1] + 2 * pairs) as session:
        hidden = session.step(model.parts.embed(input_ids))
        for index in range(2 * pairs):
            model.parts.logits(hidden[:, -1:])
            relay = index % 2 == 1
            token = torch.tensor([[token_ids[index % len(token_ids)]]])
            started = time.perf_counter()
            hidden = session.step(model.parts.embed(token), relay=relay)
            times["relayed" if relay else "chained"].append(time.perf_counter() - started)
    return {"pairs": pairs,
            "median_step_ms": {name: round(1e3 * statistics.median(values), 2) for name, values in times.items()},
            "chained_faster_in_pairs": sum(c < r for c, r in zip(times["chained"], times["relayed"]))}


def wire_perplexity(local, text_path: Path, tokens: int = 4096, window: int = 1024) -> dict:
    """Perplexity of the 3-span pipeline with hidden states encoded/decoded at each span boundary."""
    if not text_path.is_file():
        return {}
    ids = local.parts.tokenizer(text_path.read_text(encoding="utf-8")[:200_000])["input_ids"][:tokens]
    result = {}
    for wire_format in codec.WIRE_FORMATS:
        total, count = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start:start + window]])
            with torch.inference_mode():
                hidden = local.parts.embed(chunk)
                for span in local.spans:
                    hidden = codec.decode_hidden(codec.encode_hidden(span(hidden), wire_format), wire_format, torch.float32)
                logits = local.parts.logits(hidden)[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
        result[wire_format] = round(float(torch.exp(torch.tensor(total / count))), 3)
    return result


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


MODES = {"chained": RemoteClientConfig(), "chained_answer_along_chain": RemoteClientConfig(direct_delivery=False),
         "relayed": RemoteClientConfig(relay=True)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-perplexity", action="store_true", help="leave out the wire formats' perplexity")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--client-threads", type=int, default=1, help="torch threads of the swarm's client")
    parser.add_argument("--repeats", type=int, default=8, help="interleaved rounds; each mode's best round counts")
    parser.add_argument("--step-pairs", type=int, default=100, help="chained and relayed decode steps taken in turn")
    args = parser.parse_args()
    if min(args.repeats, args.step_pairs, args.server_threads, args.client_threads) < 1:
        parser.error("--repeats, --step-pairs, --server-threads and --client-threads must be at least 1")
    local = LocalModelForCausalLM.load(MODEL, parse_spans("0:10,10:20,20:30"))
    input_ids = local.encode_prompt(PROMPT)
    with LocalSwarm(MODEL) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:10", "10:20", "20:30"):
            swarm.start_server(blocks, extra=["--no-rebalance", "--torch-threads", str(args.server_threads)])
        swarm.wait_until_online(3)
        remote = {name: DistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers, config)
                  for name, config in MODES.items()}
        try:
            local_threads = sorted({1, torch.get_num_threads()})
            locals_by_threads = {f"local_{threads}": WithThreads(local, threads) for threads in local_threads}
            clients = {name: WithThreads(model, args.client_threads) for name, model in remote.items()}
            results = measure_interleaved({**locals_by_threads, **clients}, input_ids, args.repeats)
            steps = alternating_steps(remote["chained"], input_ids, results["chained"]["token_ids"], args.step_pairs,
                                      args.client_threads)
        finally:
            for model in remote.values():
                model.shutdown()
        local_by_threads = {name: results.pop(name) for name in locals_by_threads}
        local_name = max(local_by_threads, key=lambda name: local_by_threads[name]["tokens_per_s"])
        local_result = local_by_threads[local_name]
        server_rss = [round(peak_rss_mib(server.process.pid), 1) for server in swarm.servers]
    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.raw"
    perplexity = {} if args.skip_perplexity else wire_perplexity(local, text)
    one_token = torch.randn(1, 1, 576)
    bytes_per_hop = {fmt: codec.wire_bytes(codec.encode_hidden(one_token, fmt)) for fmt in codec.WIRE_FORMATS}
    print(json.dumps({
        "benchmark": "swarm_vs_local", "servers": 3, "new_tokens": TOKENS, "server_torch_threads": args.server_threads,
        "local_torch_threads": int(local_name.removeprefix("local_")),
        "local_tokens_per_s_by_threads": {name.removeprefix("local_"): result["tokens_per_s"]
                                          for name, result in local_by_threads.items()},
        "local_tokens_per_s": local_result["tokens_per_s"],
        "chained_tokens_per_s": results["chained"]["tokens_per_s"],
        "relayed_tokens_per_s": results["relayed"]["tokens_per_s"],
        "chained_over_local": round(results["chained"]["tokens_per_s"] / local_result["tokens_per_s"], 3),
        "relayed_over_local": round(results["relayed"]["tokens_per_s"] / local_result["tokens_per_s"], 3),
        "chained_over_relayed": round(results["chained"]["tokens_per_s"] / results["relayed"]["tokens_per_s"], 3),
        "answer_along_chain_tokens_per_s": results["chained_answer_along_chain"]["tokens_per_s"],
        "answer_along_chain_over_local": round(results["chained_answer_along_chain"]["tokens_per_s"] / local_result["tokens_per_s"], 3),
        "time_to_first_token_s": {"local": local_result["time_to_first_token_s"],
                                  **{name: result["time_to_first_token_s"] for name, result in results.items()}},
        "same_tokens_as_local": all(r["token_ids"] == local_result["token_ids"]
                                    for r in [*results.values(), *local_by_threads.values()]),
        "repeats": args.repeats,
        "tokens_per_s_by_round": {"local": local_result["rounds"], **{name: result["rounds"] for name, result in results.items()}},
        "chained_beat_relayed_in_rounds": sum(chained > relayed for chained, relayed in
                                              zip(results["chained"]["rounds"], results["relayed"]["rounds"])),
        "decode_steps_in_turn": steps,
        "bytes_per_token_per_hop": bytes_per_hop,
        "server_peak_rss_mib": server_rss,
        "wikitext2_perplexity_by_wire_format_4096_tokens": perplexity,
    }))


if __name__ == "__main__":
    main()
