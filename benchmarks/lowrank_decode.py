"""Decode-step time of a 10-block span of SmolLM2-135M, dense vs low-rank (plain SVD, eq. 15 ranks
per matrix) at several compression ratios C: one token with a 128-token KV cache, float32, the
variants measured interleaved (so that a noisy moment hits all alike), median of 35 steps, with
2 and 1 compute threads. Prints one JSON line.

Usage: python benchmarks/lowrank_decode.py [--ratios 0.9,0.8,0.7,0.6,0.4]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from efedllm.compression.apply import CompressionConfig, compress_layers  # noqa: E402
from efedllm.models.span import load_span  # noqa: E402

CONTEXT, STEPS, WARM_UP = 128, 40, 5


def decode_step_ms(span, generator: torch.Generator) -> float:
    cache = span.new_cache()
    with torch.no_grad():
        span(torch.randn(1, CONTEXT, span.hidden_size, generator=generator), position=0, cache=cache)
        token = torch.randn(1, 1, span.hidden_size, generator=generator)
        started = time.perf_counter()
        span(token, position=CONTEXT, cache=cache)
    return 1000 * (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.9,0.8,0.7,0.6,0.4")
    args = parser.parse_args()
    dense = load_span("smollm2-135m", 0, 10)
    spans = {"dense": dense}
    for ratio in (float(value) for value in args.ratios.split(",")):
        span = copy.deepcopy(dense)
        compress_layers(span.layers, CompressionConfig(ratio=ratio, method="plain", allocation="uniform"))
        spans[f"C={ratio}"] = span
    generator = torch.Generator().manual_seed(0)
    result = {"benchmark": "lowrank_decode", "blocks": 10, "context_tokens": CONTEXT}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        times = {name: [] for name in spans}
        for _ in range(STEPS):
            for name, span in spans.items():
                times[name].append(decode_step_ms(span, generator))
        medians = {name: round(statistics.median(values[WARM_UP:]), 3) for name, values in times.items()}
        result[f"decode_ms_{threads}_threads"] = medians
        result[f"speedup_over_dense_{threads}_threads"] = {name: round(medians["dense"] / value, 3) for name, value in medians.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
