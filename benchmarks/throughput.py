"""Many users at once: aggregate tokens/s through a 3-server swarm on 127.0.0.1 against transformers'
batched ``generate`` in this process, measured in the same run. Prints one JSON line.

Measured, each with ``--tokens`` greedy tokens per prompt (EOS ignored, so every row runs its budget):
- ``hf_generate``: transformers' ``generate`` on the same GGUF at batch 1, 8 and 32 (left padding), each at
  1 and at 2 torch threads; the faster counts (the best local configuration on this machine);
- ``local_pipeline``: efedllm's own in-process pipeline, one stream, best of 1 and 2 threads;
- ``swarm_concurrent``: 1, 8 and 32 sessions generating at once through the swarm (threads of one
  client process, one session each): aggregate tokens/s and per-session inter-token latency p50/p99;
- ``engine_concurrent``: 8 and 32 requests at once through the engine ``efedllm api`` runs (its own sessions
  per request, all stepped together);
- ``swarm_batch``: one client generating a batch of 32 prompts (``generate_batch``);
- ``interactive``: one session's inter-token latency alone (p50) and while another client process generates
  batches of 31 prompts (p99);
- ``one_server``: a 1-server swarm holding all 30 blocks alternated with the local pipeline (best of three each);
- each server's peak RSS; the ratios the issue's acceptance reads.

The chain's servers compute with ``--server-threads`` torch threads (default: their share of the machine's
cores, server/swarm.py ``threads_per_server``; 1 on 2 cores, where 2 each measured 13 tokens/s for 8 concurrent
sessions against 30), the 1-server swarm with all the cores; servers hold up to 72 sessions of one peer. Usage: python benchmarks/throughput.py [--tokens N] [--server-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the efedllm CLI does (server/swarm.py): before torch loads

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from efedllm.api.engine import GenerationEngine, Job  # noqa: E402
from efedllm.client.local import LocalModelForCausalLM  # noqa: E402
from efedllm.client.remote import DistributedModelForCausalLM  # noqa: E402
from efedllm.client.sampling import GenerationConfig  # noqa: E402
from efedllm.common.spans import parse_spans  # noqa: E402
from efedllm.models.sources import resolve_model  # noqa: E402
from efedllm.server.swarm import LocalSwarm, machine_cores, threads_per_server  # noqa: E402

MODEL = "smollm2-135m"
TOPICS = ["a lighthouse keeper", "the moon", "a busy market", "an old clock", "rain in the city", "a mountain village",
          "a robot learning to paint", "the first day of school"]


def prompts(count: int) -> list[str]:
    return [f"Write a short story about {TOPICS[index % len(TOPICS)]} (number {index})." for index in range(count)]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))] if ordered else float("nan")


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:])]


def hf_generate(tokenizer_texts: list[str], model, tokenizer, tokens: int) -> float:
    """tokens/s of transformers' batched greedy generate over these chat-templated prompts."""
    batch = tokenizer(tokenizer_texts, return_tensors="pt", padding=True, add_special_tokens=False)
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**batch, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                                eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    return (output.shape[1] - batch["input_ids"].shape[1]) * len(tokenizer_texts) / seconds


def measure_hf(sizes: list[int], tokens: int, encode) -> dict:
    path = resolve_model(MODEL).path
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = encode.__self__.parts.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [tokenizer.decode(encode(prompt)[0]) for prompt in prompts(max(sizes))]
    result, previous = {}, torch.get_num_threads()
    hf_generate(texts[:2], model, tokenizer, 4)  # warm-up
    for size in sizes:
        speeds = {}
        for threads in (1, 2, 1, 2):  # alternated, best of two each
            torch.set_num_threads(threads)
            speeds[threads] = max(speeds.get(threads, 0.0), hf_generate(texts[:size], model, tokenizer, tokens))
        result[f"batch_{size}"] = {f"threads_{threads}": round(speed, 2) for threads, speed in speeds.items()}
        result[f"batch_{size}"]["best"] = round(max(speeds.values()), 2)
    torch.set_num_threads(previous)
    return result


def measure_local(local: LocalModelForCausalLM, config: GenerationConfig) -> dict:
    input_ids, previous, speeds = local.encode_prompt(prompts(1)[0]), torch.get_num_threads(), {}
    ttft = {}
    local.generate(input_ids, GenerationConfig(max_new_tokens=4, greedy=True))
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        result = local.generate(input_ids, config)
        if result.tokens_per_s > speeds.get(threads, 0.0):
            speeds[threads], ttft[threads] = result.tokens_per_s, result.time_to_first_token
    torch.set_num_threads(previous)
    best = max(speeds, key=speeds.get)
    return {"threads_1": round(speeds[1], 2), "threads_2": round(speeds[2], 2), "best": round(speeds[best], 2),
            "time_to_first_token_s": round(ttft[best], 4)}


def concurrent(model, count: int, config: GenerationConfig) -> dict:
    """``count`` sessions generating at once, one thread each; aggregate tokens/s and inter-token latencies."""
    results, texts = [None] * count, prompts(count)

    def run(index: int) -> None:
        results[index] = model.generate(model.encode_prompt(texts[index]), config)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=900)
    seconds = time.perf_counter() - started
    latencies = [gap for result in results if result is not None for gap in gaps(result.token_times)]
    return {"sessions": count, "tokens_per_s": round(sum(r.new_tokens for r in results if r) / seconds, 2),
            "inter_token_p50_s": round(percentile(latencies, 0.5), 4), "inter_token_p99_s": round(percentile(latencies, 0.99), 4),
            "time_to_first_token_s": round(statistics.median(r.time_to_first_token for r in results if r), 4),
            "completed": sum(r is not None for r in results)}


def engine_concurrent(model, count: int, config: GenerationConfig) -> dict:
    """``count`` requests at once through the continuous-batching engine that ``efedllm api`` runs
    (api/engine.py): every row is a session of its own on each server, and all rows step together, so the
    servers merge their steps into one pass and the LM head runs once for them."""
    engine = GenerationEngine(model.parts, model.row_sessions(), set(), max_rows=count, max_pending=count).start()
    times: list[list[float]] = [[] for _ in range(count)]
    finished = threading.Semaphore(0)

    def emit_for(index: int):
        def emit(event) -> None:
            if event.error is not None or event.finish_reason is not None:
                finished.release()
            else:
                times[index].append(time.perf_counter())
        return emit

    started = time.perf_counter()
    try:
        for index, text in enumerate(prompts(count)):
            engine.submit(Job([model.encode_prompt(text)], [config], emit_for(index)))
        completed = sum(finished.acquire(timeout=900) for _ in range(count))
        seconds = time.perf_counter() - started
        tokens_total = engine.tokens_total
    finally:
        engine.shutdown()
    latencies = [gap for row in times for gap in gaps(row)]
    return {"requests": count, "tokens_per_s": round(tokens_total / seconds, 2), "completed": completed,
            "inter_token_p50_s": round(percentile(latencies, 0.5), 4), "inter_token_p99_s": round(percentile(latencies, 0.99), 4)}


def interactive(model, config: GenerationConfig, background: int, initial_peers: list[str]) -> dict:
    """One session's inter-token latency alone, then while another client (its own process: another user, not
    threads sharing this one's interpreter) generates batches of ``background`` prompts without pause."""
    alone = model.generate(model.encode_prompt("Tell me a joke."), config)
    command = [sys.executable, __file__, "--background-rows", str(background), "--tokens", str(config.max_new_tokens),
               *[argument for peer in initial_peers for argument in ("--initial-peers", peer)]]
    load = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        if load.stdout.readline().strip() != "generating":
            raise RuntimeError("the background client did not start")
        time.sleep(3.0)  # its rows are past their prefills and decoding
        loaded = model.generate(model.encode_prompt("Tell me a joke."), config)
    finally:
        load.terminate()
        load.wait(timeout=60)
    alone_gaps, loaded_gaps = gaps(alone.token_times), gaps(loaded.token_times)
    p50_alone = percentile(alone_gaps, 0.5)
    return {"background_sessions": background, "alone_p50_s": round(p50_alone, 4),
            "loaded_p50_s": round(percentile(loaded_gaps, 0.5), 4), "loaded_p99_s": round(percentile(loaded_gaps, 0.99), 4),
            "p99_loaded_over_p50_alone": round(percentile(loaded_gaps, 0.99) / p50_alone, 3)}


def background_client(initial_peers: list[str], rows: int, tokens: int) -> None:
    """The load of :func:`interactive`: batches of ``rows`` prompts, one after another, until terminated."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave through the finally: its DHT child must stop too
    model = DistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=initial_peers)
    try:
        config = GenerationConfig(max_new_tokens=tokens, greedy=True, stop_on_eos=False)
        print("generating", flush=True)
        while True:
            model.generate_batch(prompts(rows), config)
    finally:
        model.shutdown()


def one_server(local: LocalModelForCausalLM, config: GenerationConfig, local_threads: int, server_threads: int) -> dict:
    """A swarm of ONE server holding all 30 blocks (pure software overhead, no core sharing between servers),
    alternated with the local pipeline at its best thread count in the same run; best of three each."""
    input_ids, speeds, ttft = local.encode_prompt(prompts(1)[0]), {"local": [], "swarm": []}, {"local": [], "swarm": []}
    with LocalSwarm(MODEL) as swarm:
        swarm.start_bootstrap()
        swarm.start_server("0:30", extra=["--no-rebalance", "--torch-threads", str(server_threads)])
        swarm.wait_until_online(1)
        model = DistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=swarm.initial_peers)
        try:
            model.generate(input_ids, GenerationConfig(max_new_tokens=4, greedy=True))  # warm-up
            for _ in range(3):
                for name, runner in (("local", local), ("swarm", model)):
                    torch.set_num_threads(local_threads if name == "local" else 2)
                    result = runner.generate(input_ids, config)
                    speeds[name].append(result.tokens_per_s)
                    ttft[name].append(result.time_to_first_token)
        finally:
            model.shutdown()
    return {"local_tokens_per_s": round(max(speeds["local"]), 2), "swarm_tokens_per_s": round(max(speeds["swarm"]), 2),
            "local_time_to_first_token_s": round(min(ttft["local"]), 4),
            "swarm_time_to_first_token_s": round(min(ttft["swarm"]), 4),
            "swarm_over_local": round(max(speeds["swarm"]) / max(speeds["local"]), 3),
            "time_to_first_token_over_local": round(min(ttft["swarm"]) / min(ttft["local"]), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--server-threads", type=int, default=threads_per_server(3, machine_cores()))
    parser.add_argument("--client-threads", type=int, default=2)
    parser.add_argument("--background-rows", type=int, default=None, help=argparse.SUPPRESS)  # the load's own process
    parser.add_argument("--initial-peers", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.background_rows is not None:
        return background_client(args.initial_peers, args.background_rows, args.tokens)
    config = GenerationConfig(max_new_tokens=args.tokens, greedy=True, stop_on_eos=False)
    local = LocalModelForCausalLM.load(MODEL, parse_spans("0:30"))
    output = {"model": MODEL, "tokens_per_prompt": args.tokens, "server_threads": args.server_threads,
              "hf_generate": measure_hf([1, 8, 32], args.tokens, local.encode_prompt),
              "local_pipeline": measure_local(local, config)}
    best_threads = 1 if output["local_pipeline"]["threads_1"] >= output["local_pipeline"]["threads_2"] else 2
    output["one_server"] = one_server(local, config, best_threads, machine_cores())
    del local
    with LocalSwarm(MODEL) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:10", "10:20", "20:30"):
            swarm.start_server(blocks, extra=["--no-rebalance", "--torch-threads", str(args.server_threads),
                                              "--max-sessions", "72", "--max-sessions-per-peer", "72"])
        swarm.wait_until_online(3)
        torch.set_num_threads(args.client_threads)
        model = DistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=swarm.initial_peers)
        try:
            model.generate(model.encode_prompt("Hello"), GenerationConfig(max_new_tokens=4, greedy=True))  # warm-up
            output["swarm_concurrent"] = {str(count): concurrent(model, count, config) for count in (1, 8, 32)}
            output["engine_concurrent"] = {str(count): engine_concurrent(model, count, config) for count in (8, 32)}
            started = time.perf_counter()
            batch = model.generate_batch(prompts(32), config)
            output["swarm_batch"] = {"prompts": 32, "tokens_per_s": round(sum(r.new_tokens for r in batch)
                                                                           / (time.perf_counter() - started), 2)}
            output["interactive"] = interactive(model, config, 31, swarm.initial_peers)
        finally:
            model.shutdown()
        output["server_peak_rss_mib"] = [peak_rss_mib(server.process.pid) for server in swarm.servers]
    hf, swarm_runs, local_best = output["hf_generate"], output["swarm_concurrent"], output["local_pipeline"]["best"]
    output["ratios"] = {
        "concurrent_8_over_hf_batch_8": round(swarm_runs["8"]["tokens_per_s"] / hf["batch_8"]["best"], 3),
        "concurrent_32_over_hf_batch_32": round(swarm_runs["32"]["tokens_per_s"] / hf["batch_32"]["best"], 3),
        "engine_8_over_hf_batch_8": round(output["engine_concurrent"]["8"]["tokens_per_s"] / hf["batch_8"]["best"], 3),
        "engine_32_over_hf_batch_32": round(output["engine_concurrent"]["32"]["tokens_per_s"] / hf["batch_32"]["best"], 3),
        "batch_32_over_hf_batch_32": round(output["swarm_batch"]["tokens_per_s"] / hf["batch_32"]["best"], 3),
        "single_stream_over_best_local": round(swarm_runs["1"]["tokens_per_s"] / max(local_best, hf["batch_1"]["best"]), 3),
        "one_server_over_local": output["one_server"]["swarm_over_local"],
        "time_to_first_token_over_local": round(swarm_runs["1"]["time_to_first_token_s"]
                                                / output["local_pipeline"]["time_to_first_token_s"], 3),
    }
    print(json.dumps(output))


if __name__ == "__main__":
    main()
