"""Memory reads with and without a memory hierarchy: Theorem 4.1, Table 2 and Table 3 (paper §4.1, §4.3).

The counting model (reconstructed from the paper's statements; see the report for what was read):

- *Without a hierarchy* every multiply-add of ``C = A·B`` (A is m × n, B is n × p) reads both of
  its operands from global memory, so one output element costs 2n reads and the product 2mnp.
- *With a hierarchy* a thread block computes a k × m' tile of C and first copies the k rows of A
  and the m' columns of B it needs into its block (shared) memory, reading each once. Over all
  tiles that is ``mnp/m' + mnp/k`` reads, hence Theorem 4.1's reduction rate
  ``R_t = 1 − 1/(2k) − 1/(2m')``.
- The paper's Table 2 ("federated") lets block memory hold whole matrices: one tile of n × n,
  reads ``2n²`` against the centralised ``2n³``.

``efedllm.analysis.io_model`` measures what these formulas leave out: a finite block memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TABLE2_SIZES: tuple[int, ...] = (5, 10, 100, 10_000)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def theorem41_reduction_rate(tile_rows: int, tile_cols: int) -> float:
    """Theorem 4.1: ``R_t = 1 − 1/(2k) − 1/(2m)`` for a k × m output tile held in block memory."""
    _check_positive(tile_rows=tile_rows, tile_cols=tile_cols)
    return 1.0 - 1.0 / (2 * tile_rows) - 1.0 / (2 * tile_cols)


def reads_without_hierarchy(m: int, n: int, p: int) -> int:
    """Global reads of (m × n)·(n × p) when every multiply-add reads both operands: 2mnp."""
    _check_positive(m=m, n=n, p=p)
    return 2 * m * n * p


def reads_with_tiles(m: int, n: int, p: int, tile_rows: int, tile_cols: int) -> int:
    """Global reads of (m × n)·(n × p) computed in tile_rows × tile_cols output tiles.

    Each tile reads its rows of A (rows·n) and its columns of B (n·cols) once. Summed over the
    ⌈m/k⌉·⌈p/m'⌉ tiles (edge tiles smaller): ``n·(m·⌈p/m'⌉ + p·⌈m/k⌉)``; equals
    ``2mnp·(1 − R_t)`` when the tile divides the matrix.
    """
    _check_positive(m=m, n=n, p=p, tile_rows=tile_rows, tile_cols=tile_cols)
    return n * (m * math.ceil(p / tile_cols) + p * math.ceil(m / tile_rows))


def reads_whole_matrices(m: int, n: int, p: int) -> int:
    """Global reads when block memory holds both whole operands: each element read once, mn + np."""
    return reads_with_tiles(m, n, p, tile_rows=m, tile_cols=p)


@dataclass(frozen=True)
class Table2Row:
    """One row of Table 2: two n × n matrices multiplied, centralised vs federated (hierarchy)."""

    n: int
    centralised_reads: int
    federated_reads: int

    @property
    def reduction_rate(self) -> float:
        return 1.0 - self.federated_reads / self.centralised_reads


def table2(sizes: tuple[int, ...] = TABLE2_SIZES) -> list[Table2Row]:
    """Table 2: 2n³ reads without hierarchy vs 2n² with block memory holding whole matrices.

    The reduction ``1 − 1/n`` is Theorem 4.1 with k = m = n.
    """
    return [
        Table2Row(n=n, centralised_reads=reads_without_hierarchy(n, n, n), federated_reads=reads_whole_matrices(n, n, n))
        for n in sizes
    ]


@dataclass(frozen=True)
class Table3Row:
    """One quantity of Table 3 for the dense product WX and the SVD product ŴX = U_k Σ_k V_kᵀ X."""

    quantity: str
    dense: int
    low_rank: int

    @property
    def reduction_rate(self) -> float:
        return 1.0 - self.low_rank / self.dense


def lowrank_storage(m: int, n: int, rank: int) -> int:
    """Elements stored for U_k (m × k), Σ_k (k) and V_kᵀ (k × n): k(m + n + 1) (paper eq. 9)."""
    _check_positive(m=m, n=n, rank=rank)
    return rank * (m + n + 1)


def lowrank_reads_without_hierarchy(m: int, n: int, p: int, rank: int) -> int:
    """Reads of U_k(Σ_k(V_kᵀ X)) when every multiply reads both operands from global memory.

    V_kᵀX costs 2knp, the diagonal scaling 2kp (σ and the entry), U_k·(…) costs 2mkp:
    in all ``2kp(m + n + 1)``, so the ratio to 2mnp is the storage ratio k(m+n+1)/(mn).
    """
    _check_positive(p=p)
    return 2 * p * lowrank_storage(m, n, rank)


def lowrank_reads_with_hierarchy(m: int, n: int, p: int, rank: int) -> int:
    """Reads of ŴX when block memory holds whole factors and the k × p intermediates stay there.

    Every factor element and every element of X is read once: ``k(m + n + 1) + np``.
    """
    _check_positive(p=p)
    return lowrank_storage(m, n, rank) + n * p


def table3(m: int, n: int, p: int, rank: int) -> list[Table3Row]:
    """Table 3: storage and memory reads of WX vs ŴX, without and with the memory hierarchy.

    W is m × n, X is n × p, Ŵ keeps ``rank`` singular triplets. Storage counts weights only
    (X is the same on both sides).
    """
    if rank > min(m, n):
        raise ValueError(f"rank {rank} exceeds min(m, n) = {min(m, n)}")
    return [
        Table3Row("storage (weight elements)", m * n, lowrank_storage(m, n, rank)),
        Table3Row("reads, no hierarchy", reads_without_hierarchy(m, n, p), lowrank_reads_without_hierarchy(m, n, p, rank)),
        Table3Row("reads, with hierarchy", reads_whole_matrices(m, n, p), lowrank_reads_with_hierarchy(m, n, p, rank)),
    ]
