"""The OpenAI-compatible API against the Python client, through the same 3-server swarm on 127.0.0.1, in one run.

Variants, alternated round by round (``--rounds``), each generating ``--tokens`` greedy tokens per prompt:
- ``python``: ``DistributedModelForCausalLM.generate`` in this process; 8 concurrent requests are 8 threads;
- ``api``: ``efedllm api`` in a process of its own, driven by the official ``openai`` package (streaming);
  8 concurrent requests are 8 concurrent streams of one ``AsyncOpenAI`` client.
Per variant: aggregate tokens/s (tokens generated / wall time) and mean time to first token (the first text
for the API, the first token chosen for the Python client), mean over rounds. Prints one JSON line.

Usage: python benchmarks/api.py [--tokens N] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the efedllm CLI does (server/swarm.py): before torch loads

import openai  # noqa: E402

from efedllm.client.remote import DistributedModelForCausalLM  # noqa: E402
from efedllm.client.sampling import GenerationConfig  # noqa: E402
from efedllm.server.swarm import LocalSwarm  # noqa: E402

MODEL = "smollm2-135m"
PROMPTS = [f"Write a short story about {topic}." for topic in
           ("a lighthouse keeper", "the moon", "a busy market", "an old clock", "rain in the city", "a mountain village",
            "a robot learning to paint", "the first day of school")]


def python_client(model, count: int, tokens: int) -> dict:
    config = GenerationConfig(max_new_tokens=tokens, greedy=True)
    results = [None] * count

    def one(index: int) -> None:
        results[index] = model.generate(model.encode_prompt(PROMPTS[index]), config)

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"tokens": sum(len(result.token_times) for result in results), "seconds": wall,
            "time_to_first_token": statistics.mean(result.time_to_first_token for result in results)}


async def api_client(url: str, count: int, tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(index: int) -> tuple[int, float]:
        started, first = time.perf_counter(), None
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPTS[index]}], max_tokens=tokens, temperature=0,
            stream=True, stream_options={"include_usage": True})
        used = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - started
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        return used, first or 0.0

    started = time.perf_counter()
    try:
        outcomes = await asyncio.gather(*(one(index) for index in range(count)))
    finally:
        await client.close()
    wall = time.perf_counter() - started
    return {"tokens": sum(used for used, _ in outcomes), "seconds": wall,
            "time_to_first_token": statistics.mean(first for _, first in outcomes)}


def start_api(initial_peers: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "efedllm.cli", "api", "--initial-peers", *initial_peers, "--port", "0",
                                "--probe-interval", "3600"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    if not line:
        raise RuntimeError("efedllm api did not start")
    return process, json.loads(line)["url"]


def summary(runs: list[dict]) -> dict:
    return {"tokens_per_s": round(statistics.mean(run["tokens"] / run["seconds"] for run in runs), 3),
            "time_to_first_token_s": round(statistics.mean(run["time_to_first_token"] for run in runs), 4),
            "tokens": runs[0]["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)  # single-stream rounds vary by ~10% here: 3 were too few
    args = parser.parse_args()
    with LocalSwarm(MODEL) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:10", "10:20", "20:30"):
            swarm.start_server(blocks, extra=["--no-rebalance"])
        swarm.wait_until_online(3)
        model = DistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers)
        api, url = start_api(swarm.initial_peers)
        try:
            python_client(model, 1, 4)  # warm both paths up
            asyncio.run(api_client(url, 1, 4))
            runs = {(variant, count): [] for variant in ("python", "api") for count in (1, 8)}
            for _ in range(args.rounds):
                for count in (1, 8):
                    runs[("python", count)].append(python_client(model, count, args.tokens))
                    runs[("api", count)].append(asyncio.run(api_client(url, count, args.tokens)))
        finally:
            api.terminate()
            api.wait(timeout=30)
            model.shutdown()
    result = {"model": MODEL, "servers": 3, "tokens_per_request": args.tokens, "rounds": args.rounds}
    for count in (1, 8):
        python, through_api = summary(runs[("python", count)]), summary(runs[("api", count)])
        result[f"requests_{count}"] = {"python_client": python, "api": through_api,
                                       "api_over_python_tokens_per_s": round(through_api["tokens_per_s"] / python["tokens_per_s"], 3),
                                       "api_over_python_time_to_first_token": round(
                                           through_api["time_to_first_token_s"] / python["time_to_first_token_s"], 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
