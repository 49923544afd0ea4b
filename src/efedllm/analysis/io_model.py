"""A two-level memory with a finite block memory: what Theorem 4.1 leaves out.

Theorem 4.1 and Table 2 assume block memory holds a whole tile's operands (Table 2: whole
matrices). Real block memory holds M elements (H100: 228 KiB of shared memory per SM, about
58 000 float32). Here C = A·B (A is m × n, B is n × p) runs on a global memory and a block
memory of ``capacity`` elements, and every element copied from global memory is counted:

- ``tiled_matmul`` executes the tiled schedule with explicit loads into a capacity-checked block
  memory: a tile_rows × tile_cols block of C stays resident, and for each depth slice the
  matching tile_rows × depth slice of A and depth × tile_cols slice of B are loaded. Reads:
  ``mnp·(1/tile_cols + 1/tile_rows)`` (divisible case), whatever the depth.
- ``unstaged_matmul`` executes the no-hierarchy schedule: each output element loads its row of
  A and column of B (2mnp reads).
- ``lru_naive_reads`` runs the plain i-j-l loop against an LRU block memory of M elements.

With square tiles s × s and depth 1 the block memory needs ``s² + 2s ≤ M``, so the best
schedule reads about ``2mnp/√M``: the classic I/O bound of matrix multiplication (Hong & Kung
1981; Smith et al. 2019 show the constant 2 is tight). Theorem 4.1's ``1 − 1/(2k) − 1/(2m)`` is
reached only when ``M ≥ km + k + m``; Table 2's whole-matrix figure ``1 − 1/n`` needs
``M ≥ n² + 2n`` (n = 10 000: 400 MB of block memory).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from efedllm.analysis.memory import reads_with_tiles


class BlockMemoryOverflow(ValueError):
    """A schedule needed more resident elements than the block memory holds."""


@dataclass
class ReadCounter:
    """Counts elements copied from global memory; ``capacity`` is the block memory size (None: unbounded)."""

    capacity: int | None = None
    global_reads: int = 0
    peak_resident: int = field(default=0)

    def reserve(self, resident: int) -> None:
        """Declare that ``resident`` elements must be in block memory at once."""
        if self.capacity is not None and resident > self.capacity:
            raise BlockMemoryOverflow(f"schedule needs {resident} resident elements, block memory holds {self.capacity}")
        self.peak_resident = max(self.peak_resident, resident)

    def load(self, block: np.ndarray) -> np.ndarray:
        self.global_reads += block.size
        return np.array(block, copy=True)


def tiled_matmul(
    a: np.ndarray, b: np.ndarray, tile_rows: int, tile_cols: int, depth: int, counter: ReadCounter
) -> np.ndarray:
    """C = A·B tile by tile; A [m, n], B [n, p] -> C [m, p], reads counted in ``counter``."""
    (m, n), p = a.shape, b.shape[1]
    rows, cols, depth = min(tile_rows, m), min(tile_cols, p), min(depth, n)
    counter.reserve(rows * cols + rows * depth + depth * cols)
    c = np.zeros((m, p), dtype=np.result_type(a, b))
    for i0 in range(0, m, rows):
        for j0 in range(0, p, cols):
            accumulator = np.zeros((min(rows, m - i0), min(cols, p - j0)), dtype=c.dtype)  # resident C tile
            for l0 in range(0, n, depth):
                a_tile = counter.load(a[i0 : i0 + rows, l0 : l0 + depth])  # [rows, depth]
                b_tile = counter.load(b[l0 : l0 + depth, j0 : j0 + cols])  # [depth, cols]
                accumulator += a_tile @ b_tile
            c[i0 : i0 + rows, j0 : j0 + cols] = accumulator
    return c


def unstaged_matmul(a: np.ndarray, b: np.ndarray, counter: ReadCounter) -> np.ndarray:
    """C = A·B with no staging: every output element reads its row of A and column of B."""
    (m, _), p = a.shape, b.shape[1]
    counter.reserve(0)
    c = np.zeros((m, p), dtype=np.result_type(a, b))
    for i in range(m):
        for j in range(p):
            c[i, j] = counter.load(a[i]) @ counter.load(b[:, j])  # [n]·[n]
    return c


def lru_naive_reads(m: int, n: int, p: int, capacity: int) -> int:
    """Global reads of the i-j-l loop ``C[i,j] += A[i,l]·B[l,j]`` with an LRU block memory.

    Element-level simulation (O(mnp) steps): meant for small sizes.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}")
    cache: OrderedDict[tuple[str, int, int], None] = OrderedDict()
    reads = 0
    for i in range(m):
        for j in range(p):
            for l in range(n):  # noqa: E741  (the matmul index)
                for key in (("A", i, l), ("B", l, j)):
                    if key in cache:
                        cache.move_to_end(key)
                        continue
                    reads += 1
                    cache[key] = None
                    if len(cache) > capacity:
                        cache.popitem(last=False)
    return reads


def lru_naive_reads_closed_form(m: int, n: int, p: int, capacity: int) -> int | None:
    """The LRU loop's reads away from its two thresholds (None inside a transition band).

    A[i, l] is reused after 2n − 1 other accesses, B[l, j] after about np + n: below 2n − 1 every
    access misses (2mnp), between 2n and np + n − 1 only A's rows are kept (mn + mnp), from
    np + 2n on both operands are read once (mn + np).
    """
    if capacity < 2 * n - 1:
        return 2 * m * n * p
    if 2 * n + 1 <= capacity <= n * p + n - 2:
        return m * n + m * n * p
    if capacity >= n * p + 2 * n:
        return m * n + n * p
    return None


def best_square_tile(capacity: int, depth: int = 1) -> int:
    """The largest s with s² + 2·s·depth ≤ capacity (C tile plus one A and one B slice)."""
    if capacity < 1 + 2 * depth:
        raise ValueError(f"block memory of {capacity} elements cannot hold a 1 × 1 tile with depth {depth}")
    side = math.isqrt(capacity + depth * depth) - depth
    while (side + 1) ** 2 + 2 * (side + 1) * depth <= capacity:
        side += 1
    return side


def tiled_reads_for_capacity(m: int, n: int, p: int, capacity: int) -> int:
    """Reads of the best square-tiled schedule that fits a block memory of ``capacity`` elements."""
    side = best_square_tile(capacity)
    return reads_with_tiles(m, n, p, tile_rows=min(side, m), tile_cols=min(side, p))


def io_bound_estimate(m: int, n: int, p: int, capacity: int) -> float:
    """The classic I/O estimate for matrix multiplication: about 2mnp/√M reads."""
    return 2.0 * m * n * p / math.sqrt(capacity)


def capacity_for_tile(tile_rows: int, tile_cols: int, depth: int = 1) -> int:
    """Block memory needed for Theorem 4.1's k × m tile with one depth slice: km + depth(k + m)."""
    return tile_rows * tile_cols + depth * (tile_rows + tile_cols)


@dataclass(frozen=True)
class CapacityPoint:
    """Reads of one square product (n × n)·(n × n) at one block-memory size."""

    capacity: int
    tile_side: int
    tiled_reads: int
    bound_estimate: float
    unstaged_reads: int

    @property
    def reduction_rate(self) -> float:
        return 1.0 - self.tiled_reads / self.unstaged_reads


def capacity_sweep(n: int, capacities: list[int]) -> list[CapacityPoint]:
    """Tiled reads of an n × n product as a function of block memory M, with the 2n³/√M estimate."""
    return [
        CapacityPoint(
            capacity=capacity,
            tile_side=min(best_square_tile(capacity), n),
            tiled_reads=tiled_reads_for_capacity(n, n, n, capacity),
            bound_estimate=io_bound_estimate(n, n, n, capacity),
            unstaged_reads=2 * n**3,
        )
        for capacity in capacities
    ]


def lowrank_matmul_unstaged(
    u: np.ndarray, s: np.ndarray, v_t: np.ndarray, x: np.ndarray, counter: ReadCounter
) -> np.ndarray:
    """U_k(Σ_k(V_kᵀX)) without staging: U [m, k], s [k], Vᵀ [k, n], X [n, p] -> [m, p].

    Intermediates live in global memory, so every product and the diagonal scaling read both
    operands: 2knp + 2kp + 2mkp reads.
    """
    projected = unstaged_matmul(v_t, x, counter)  # [k, p]
    sigma = counter.load(np.repeat(s[:, None], x.shape[1], axis=1))  # one σ read per scaled entry
    scaled = sigma * counter.load(projected)  # [k, p]
    return unstaged_matmul(u, scaled, counter)


def lowrank_matmul_with_hierarchy(
    u: np.ndarray, s: np.ndarray, v_t: np.ndarray, x: np.ndarray, counter: ReadCounter
) -> np.ndarray:
    """U_k(Σ_k(V_kᵀX)) with the factors, X and the intermediates all resident in block memory.

    Each factor element and each element of X is read once: k(m + n + 1) + np reads.
    """
    (m, k), (n, p) = u.shape, x.shape
    counter.reserve(m * k + k + k * n + n * p + 2 * k * p + m * p)
    v_t_block, x_block = counter.load(v_t), counter.load(x)  # [k, n], [n, p]
    scaled = counter.load(s)[:, None] * (v_t_block @ x_block)  # [k, p], stays in block memory
    return counter.load(u) @ scaled  # [m, p]
