"""Benchmark: lookup-based softmax verification (paper §4.4) vs direct recomputation.

Prints one JSON line: for several (base, digits, fraction bits) and worker counts, the median
time of the lookup recomputation + check, the time of a direct float64 torch.softmax + compare,
the lookup's max error against float64 softmax with its derived bound, and whether an honest
server passed and each tampering was caught. ``first_call_s`` includes spawning the worker
processes. Progress goes to stderr.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from efedllm.analysis import softmax_check as check

HEADS, LENGTH, REPEATS = 9, 256, 3
CONFIGS = ((16, 5, 16), (256, 3, 20), (2, 24, 18), (8, 7, 16))
WORKERS = (1, 2)


def _median_seconds(function) -> float:
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _scores() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    causal = torch.triu(torch.ones(LENGTH, LENGTH, dtype=torch.bool), diagonal=1)
    return (3 * torch.randn(HEADS, LENGTH, LENGTH, generator=generator)).masked_fill(causal, float("-inf"))  # [h, q, k]


def _direct_check(scores: torch.Tensor, served: torch.Tensor) -> bool:
    return bool(((torch.softmax(scores.double(), dim=-1) - served.double()).abs() <= 1e-5).all())


def _run_config(scores: torch.Tensor, honest: torch.Tensor, tampered: dict, base: int, digits: int, bits: int) -> list[dict]:
    config = check.SoftmaxCheckConfig(base=base, digits=digits, fraction_bits=bits)
    reference = torch.softmax(scores.double(), dim=-1)
    rows = []
    for workers in WORKERS:
        with check.SoftmaxVerifier(config, workers) as verifier:
            start = time.perf_counter()
            verifier.verify(scores, honest)  # the pool spawns its processes on first use
            first_call = time.perf_counter() - start
            rows.append({
                "base": base, "digits": digits, "fraction_bits": bits, "workers": workers,
                "table_entries": config.table_entries,
                "lookup_verify_s": _median_seconds(lambda: verifier.verify(scores, honest)),
                "direct_verify_s": _median_seconds(lambda: _direct_check(scores, honest)),
                "first_call_s": first_call,
                "max_error": float((verifier.probabilities(scores) - reference).abs().max()),
                "error_bound": check.derive_error_bound(config, LENGTH).absolute,
                "honest_passed": verifier.verify(scores, honest).passed,
                "caught": {name: not verifier.verify(scores, probs).passed for name, probs in tampered.items()},
            })
        print(f"done b={base} K={digits} f={bits} workers={workers}", file=sys.stderr)
    return rows


def main() -> None:
    scores = _scores()
    honest = torch.softmax(scores, dim=-1)
    tampered = {
        "permuted_rows": check.tamper_permute_rows(honest, torch.Generator().manual_seed(1)),
        "temperature_1.1": check.tamper_temperature(scores, 1.1),
        "dropped_key_0": check.tamper_drop_key(honest, 0),
    }
    results = [row for base, digits, bits in CONFIGS for row in _run_config(scores, honest, tampered, base, digits, bits)]
    print(json.dumps({
        "benchmark": "softmax_check",
        "scores_shape": [HEADS, LENGTH, LENGTH],
        "torch_threads": torch.get_num_threads(),
        "results": results,
    }))


if __name__ == "__main__":
    main()
