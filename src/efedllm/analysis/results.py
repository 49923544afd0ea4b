"""Everything ``efedllm analyze`` reports: formula values next to counted and timed ones.

Counted values execute the schedules of ``io_model`` on random matrices (checking the product
against numpy's) and count the elements read from global memory; timed values run torch on this
machine. Paper values are those we could read (see ``PAPER_VALUES``); the rest are "not found".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from efedllm.analysis import bandwidth, io_model, memory
from efedllm.analysis import softmax_check as check

# What the paper prints, as far as we could read it. The paper's full text was not reachable from
# this environment (only its abstract); the issue tracker quotes these two statements.
PAPER_VALUES = {
    "theorem41": "R_t = 1 − 1/(2k) − 1/(2m) (formula; as quoted in the issue)",
    "fig7_at_0.7": "about 60 % bandwidth reduction at compression ratio 0.7 (as quoted in the issue)",
}
NOT_FOUND = "not found"
TABLE3_RATIO = 0.7
H100_SHARED_MEMORY_BYTES = 228 * 1024  # per SM, NVIDIA H100 (Hopper) specification


def _random(rows: int, cols: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols))


def _reference_product(*operands: np.ndarray) -> np.ndarray:
    """A·B for two operands, U·diag(s)·Vᵀ·X for four."""
    if len(operands) == 2:
        return operands[0] @ operands[1]
    u, s, v_t, x = operands
    return u @ (s[:, None] * (v_t @ x))


def _counted(schedule, *operands: np.ndarray, capacity: int | None = None, **options: int) -> int:
    """Run a schedule on a fresh counter, check its product, return the global reads."""
    counter = io_model.ReadCounter(capacity=capacity)
    product = schedule(*operands, counter=counter, **options)
    if not np.allclose(product, _reference_product(*operands), rtol=1e-9, atol=1e-9):
        raise AssertionError(f"{schedule.__name__} computed a wrong product")
    return counter.global_reads


@dataclass(frozen=True)
class Theorem41Row:
    tile_rows: int
    tile_cols: int
    formula: float
    counted: float
    block_memory_needed: int


def theorem41_rows(n: int = 64, tiles: tuple[tuple[int, int], ...] = ((1, 1), (2, 2), (4, 8), (8, 8), (16, 16), (64, 64))) -> list[Theorem41Row]:
    """R_t from the formula and from counting reads of an executed n × n tiled product."""
    a, b = _random(n, n, 1), _random(n, n, 2)
    unstaged = _counted(io_model.unstaged_matmul, a, b)
    rows = []
    for tile_rows, tile_cols in tiles:
        tiled = _counted(io_model.tiled_matmul, a, b, tile_rows=tile_rows, tile_cols=tile_cols, depth=1)
        rows.append(Theorem41Row(tile_rows, tile_cols, memory.theorem41_reduction_rate(tile_rows, tile_cols),
                                 1 - tiled / unstaged, io_model.capacity_for_tile(tile_rows, tile_cols)))
    return rows


@dataclass(frozen=True)
class Table2Measured:
    row: memory.Table2Row
    counted_centralised: int | None  # None: too large to execute here
    counted_federated: int | None


def table2_measured(execute_up_to: int = 100) -> list[Table2Measured]:
    results = []
    for row in memory.table2():
        if row.n > execute_up_to:
            results.append(Table2Measured(row, None, None))
            continue
        a, b = _random(row.n, row.n, 3), _random(row.n, row.n, 4)
        centralised = _counted(io_model.unstaged_matmul, a, b)
        federated = _counted(io_model.tiled_matmul, a, b, tile_rows=row.n, tile_cols=row.n, depth=row.n)
        results.append(Table2Measured(row, centralised, federated))
    return results


@dataclass(frozen=True)
class Table3Measured:
    row: memory.Table3Row
    counted_dense: int | None
    counted_low_rank: int | None


def table3_measured(shape: bandwidth.LayerShape = bandwidth.BERT_FIRST_LINEAR, ratio: float = TABLE3_RATIO) -> tuple[int, list[Table3Measured]]:
    """Table 3 for one input of the BERT layer at ``ratio``; reads counted by executing each schedule."""
    m, n, p = shape.out_features, shape.in_features, shape.tokens
    rank = bandwidth.svd_rank_for_ratio(m, n, ratio)
    w, x = _random(m, n, 5), _random(n, p, 6)
    u, s, v_t = np.linalg.svd(w, full_matrices=False)
    u, s, v_t = u[:, :rank], s[:rank], v_t[:rank]
    counted = {
        "reads, no hierarchy": (_counted(io_model.unstaged_matmul, w, x), _counted(io_model.lowrank_matmul_unstaged, u, s, v_t, x)),
        "reads, with hierarchy": (
            _counted(io_model.tiled_matmul, w, x, tile_rows=m, tile_cols=p, depth=n),
            _counted(io_model.lowrank_matmul_with_hierarchy, u, s, v_t, x),
        ),
        "storage (weight elements)": (w.size, u.size + s.size + v_t.size),
    }
    return rank, [Table3Measured(row, *counted[row.quantity]) for row in memory.table3(m, n, p, rank)]


@dataclass(frozen=True)
class BlockMemoryStudy:
    """Reads vs block memory M: closed forms for a large product, executed schedules for a small one."""

    large_n: int
    sweep: list[io_model.CapacityPoint]
    small_n: int
    small_capacities: list[int]
    small_tiled_counted: list[int]
    small_lru_counted: list[int]
    whole_matrix_capacity: dict[int, int]  # Table 2's n -> M needed for its figure
    machine_l2_bytes: int | None


def _machine_l2_bytes() -> int | None:
    """This machine's per-core L2 size, read from sysfs (None where unavailable)."""
    for index in range(4):
        base = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}")
        try:
            if (base / "level").read_text().strip() == "2":
                size = (base / "size").read_text().strip()
                return int(size.rstrip("K")) * 1024 if size.endswith("K") else int(size)
        except (OSError, ValueError):
            return None
    return None


def block_memory_study(large_n: int = 1024, small_n: int = 16) -> BlockMemoryStudy:
    capacities = [2**e for e in range(2, 23)]
    small_capacities = [3, 8, 15, 24, 35, 48, 80, 120, 200, 288, 400]
    a, b = _random(small_n, small_n, 7), _random(small_n, small_n, 8)
    tiled, lru = [], []
    for capacity in small_capacities:
        side = min(io_model.best_square_tile(capacity), small_n)
        tiled.append(_counted(io_model.tiled_matmul, a, b, capacity=capacity, tile_rows=side, tile_cols=side, depth=1))
        lru.append(io_model.lru_naive_reads(small_n, small_n, small_n, capacity))
    return BlockMemoryStudy(
        large_n=large_n,
        sweep=io_model.capacity_sweep(large_n, capacities),
        small_n=small_n,
        small_capacities=small_capacities,
        small_tiled_counted=tiled,
        small_lru_counted=lru,
        whole_matrix_capacity={n: io_model.capacity_for_tile(n, n) for n in memory.TABLE2_SIZES},
        machine_l2_bytes=_machine_l2_bytes(),
    )


@dataclass(frozen=True)
class BandwidthStudy:
    points: list[bandwidth.BandwidthPoint]
    weight_reduce_rates: list[float]
    timings: list[bandwidth.TimingPoint]
    removed_fraction_reading: bandwidth.BandwidthPoint  # "ratio 0.7" read as 70 % removed
    threads: int


def bandwidth_study(repeats: int = 15) -> BandwidthStudy:
    shape = bandwidth.BERT_FIRST_LINEAR
    return BandwidthStudy(
        points=bandwidth.bandwidth_curve(shape),
        weight_reduce_rates=[bandwidth.weight_reduce_rate(shape, c) for c in bandwidth.PAPER_RATIOS],
        timings=bandwidth.measure_dense_vs_lowrank(shape, repeats=repeats),
        removed_fraction_reading=bandwidth.bandwidth_point(shape, round(1 - 0.7, 10)),
        threads=torch.get_num_threads(),
    )


@dataclass(frozen=True)
class SoftmaxStudyRow:
    base: int
    digits: int
    fraction_bits: int
    max_error: float  # lookup softmax vs float64 torch.softmax
    error_bound: float
    honest_passed: bool
    detected: dict[str, bool]
    workers_identical: bool
    seconds_lookup: float
    seconds_direct: float


def softmax_study(configs: tuple[tuple[int, int, int], ...] = ((16, 5, 16), (256, 3, 20), (2, 24, 18), (8, 7, 16))) -> list[SoftmaxStudyRow]:
    """Random causal attention scores [2 heads, 128, 128]: accuracy, false alarms, detection."""
    generator = torch.Generator().manual_seed(0)
    causal = torch.triu(torch.ones(128, 128, dtype=torch.bool), diagonal=1)
    scores = (3 * torch.randn(2, 128, 128, generator=generator)).masked_fill(causal, float("-inf"))  # [h, q, k]
    honest = torch.softmax(scores, dim=-1)
    tampered = {
        "permuted rows": check.tamper_permute_rows(honest, generator),
        "temperature 1.1": check.tamper_temperature(scores, 1.1),
        "dropped key 0": check.tamper_drop_key(honest, 0),
    }
    rows = []
    for base, digits, fraction_bits in configs:
        config = check.SoftmaxCheckConfig(base=base, digits=digits, fraction_bits=fraction_bits)
        verifier = check.SoftmaxVerifier(config)
        start = time.perf_counter()
        lookup = verifier.probabilities(scores)
        seconds_lookup = time.perf_counter() - start
        start = time.perf_counter()
        direct = torch.softmax(scores.double(), dim=-1)
        seconds_direct = time.perf_counter() - start
        rows.append(SoftmaxStudyRow(
            base, digits, fraction_bits,
            max_error=float((lookup - direct).abs().max()),
            error_bound=check.derive_error_bound(config, scores.shape[-1]).absolute,
            honest_passed=verifier.verify(scores, honest).passed,
            detected={name: not verifier.verify(scores, probs).passed for name, probs in tampered.items()},
            workers_identical=torch.equal(check.lookup_softmax(scores, config, workers=2), lookup),
            seconds_lookup=seconds_lookup, seconds_direct=seconds_direct,
        ))
    return rows


@dataclass(frozen=True)
class AnalysisResults:
    theorem41: list[Theorem41Row]
    table2: list[Table2Measured]
    table3_rank: int
    table3: list[Table3Measured]
    block_memory: BlockMemoryStudy
    bandwidth: BandwidthStudy
    softmax: list[SoftmaxStudyRow]
    cpu_count: int


def run_all(timing_repeats: int = 15) -> AnalysisResults:
    rank, table3 = table3_measured()
    return AnalysisResults(
        theorem41=theorem41_rows(),
        table2=table2_measured(),
        table3_rank=rank,
        table3=table3,
        block_memory=block_memory_study(),
        bandwidth=bandwidth_study(timing_repeats),
        softmax=softmax_study(),
        cpu_count=os.cpu_count() or 1,
    )
