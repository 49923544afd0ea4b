"""Bandwidth of BERT's first linear layer under SVD compression: eqs. 15–17, Figs. 6–7 (paper §4.3).

Setting (from the paper): W is 3072 × 768, one input X is 768 × 30, a batch holds 10 inputs,
float32. A compression ratio c keeps ``k̂ = ⌊m·n·c / (m + n + 1)⌋`` singular triplets (eq. 15),
so the stored factors take about c times the dense weight.

Bandwidth model (our reconstruction of eqs. 16–17; the printed equations could not be read):
the bytes read from global memory for a batch with the memory hierarchy, each input's product
reading its operands once (Table 3, "with hierarchy"):

- dense  (eq. 16): ``batch · (m·n + n·p) · bytes``
- SVD    (eq. 17): ``batch · (k̂(m + n + 1) + n·p) · bytes``
- reduce rate: ``1 − SVD / dense``.

Because X's traffic is the same on both sides, the reduce rate can never exceed the weight
saving ``1 − k̂(m+n+1)/(mn) ≈ 1 − c``: about 30 % at c = 0.7, whatever the accounting.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from efedllm.analysis.memory import lowrank_storage
from efedllm.compression.rank import rank_for_ratio

PAPER_RATIOS: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass(frozen=True)
class LayerShape:
    """A linear layer's product W·X: W is out_features × in_features, X is in_features × tokens."""

    out_features: int
    in_features: int
    tokens: int
    batch: int
    bytes_per_element: int

    def __post_init__(self) -> None:
        for name in ("out_features", "in_features", "tokens", "batch", "bytes_per_element"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LayerShape.{name} must be a positive integer, got {value!r}")


BERT_FIRST_LINEAR = LayerShape(out_features=3072, in_features=768, tokens=30, batch=10, bytes_per_element=4)


def svd_rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Eq. 15 (:func:`efedllm.compression.rank.rank_for_ratio`), refusing a ratio that leaves rank 0
    (the analysis reports figures for a ratio, so it must not silently round up to rank 1)."""
    if 0.0 < ratio <= 1.0 and m * n * ratio < m + n + 1:
        raise ValueError(f"compression ratio {ratio} leaves rank 0 for a {m} × {n} matrix")
    return rank_for_ratio(m, n, ratio)


def dense_bandwidth_bytes(shape: LayerShape) -> int:
    """Eq. 16 (reconstructed): bytes read for the batch of dense products W·X_b."""
    per_input = shape.out_features * shape.in_features + shape.in_features * shape.tokens
    return shape.batch * per_input * shape.bytes_per_element


def lowrank_bandwidth_bytes(shape: LayerShape, rank: int) -> int:
    """Eq. 17 (reconstructed): bytes read for the batch of products U_k Σ_k V_kᵀ X_b."""
    factors = lowrank_storage(shape.out_features, shape.in_features, rank)
    per_input = factors + shape.in_features * shape.tokens
    return shape.batch * per_input * shape.bytes_per_element


@dataclass(frozen=True)
class BandwidthPoint:
    """Figs. 6–7 at one compression ratio."""

    ratio: float
    rank: int
    dense_bytes: int
    lowrank_bytes: int

    @property
    def reduce_rate(self) -> float:
        return 1.0 - self.lowrank_bytes / self.dense_bytes


def bandwidth_point(shape: LayerShape, ratio: float) -> BandwidthPoint:
    rank = svd_rank_for_ratio(shape.out_features, shape.in_features, ratio)
    return BandwidthPoint(ratio, rank, dense_bandwidth_bytes(shape), lowrank_bandwidth_bytes(shape, rank))


def bandwidth_curve(shape: LayerShape = BERT_FIRST_LINEAR, ratios: tuple[float, ...] = PAPER_RATIOS) -> list[BandwidthPoint]:
    """Figs. 6–7: dense vs SVD bandwidth and the reduce rate for each compression ratio."""
    return [bandwidth_point(shape, ratio) for ratio in ratios]


def weight_reduce_rate(shape: LayerShape, ratio: float) -> float:
    """``1 − k̂(m+n+1)/(mn)``: the saving on weights alone, an upper limit of the reduce rate."""
    m, n = shape.out_features, shape.in_features
    return 1.0 - lowrank_storage(m, n, svd_rank_for_ratio(m, n, ratio)) / (m * n)


@dataclass(frozen=True)
class TimingPoint:
    """Measured median wall time of the batch's dense and low-rank products at one ratio."""

    ratio: float
    rank: int
    dense_seconds: float
    lowrank_seconds: float

    @property
    def time_reduce_rate(self) -> float:
        return 1.0 - self.lowrank_seconds / self.dense_seconds


def _median_seconds(function, repeats: int) -> float:
    function()  # warm-up: allocator and kernel selection
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure_dense_vs_lowrank(
    shape: LayerShape = BERT_FIRST_LINEAR, ratios: tuple[float, ...] = PAPER_RATIOS, repeats: int = 15, seed: int = 0
) -> list[TimingPoint]:
    """Time W·X against U_k(Σ_k(V_kᵀX)) in float32 on this machine, with factors from a real SVD."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape.out_features, shape.in_features, generator=generator)  # [m, n]
    inputs = torch.randn(shape.batch, shape.in_features, shape.tokens, generator=generator)  # [B, n, p]
    left, singular, right_t = torch.linalg.svd(weight, full_matrices=False)  # [m, r], [r], [r, n]
    dense = lambda: torch.matmul(weight, inputs)  # noqa: E731  [B, m, p]
    points = []
    for ratio in ratios:
        rank = svd_rank_for_ratio(shape.out_features, shape.in_features, ratio)
        u_k = left[:, :rank].contiguous()  # [m, k]
        s_k = singular[:rank].reshape(rank, 1)  # [k, 1]
        v_k_t = right_t[:rank].contiguous()  # [k, n]
        lowrank = lambda: torch.matmul(u_k, s_k * torch.matmul(v_k_t, inputs))  # noqa: E731  [B, m, p]
        # dense timed next to each low-rank point so that load drift on a shared machine cancels
        points.append(TimingPoint(ratio, rank, _median_seconds(dense, repeats), _median_seconds(lowrank, repeats)))
    return points
