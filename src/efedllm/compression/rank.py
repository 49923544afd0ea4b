"""Rank rules of SVD compression (paper §4.2, eqs. 9, 10, 12 and 15): pure functions, no torch.

A rank-k truncated SVD of an m × n matrix stores U_k (m × k), Σ_k (k) and V_kᵀ (k × n):
``P = k·(m + n + 1)`` numbers (eq. 9) against ``m·n`` dense. The compression ratio is
``c = P / (m·n)`` (eq. 10), so the largest rank that fits a ratio c is
``k̂ = ⌊m·n·c / (m + n + 1)⌋`` (eq. 15). The energy rule (eq. 12) keeps the smallest k whose
singular values hold a fraction e of ``Σ σ_i²``.

Check against the paper's GPT-2 example: a 768 × 2304 matrix keeping 40% of its 768 singular
values (k = 307) stores 307·3073 = 943,411 numbers, 53.32% of 1,769,472.

The same rank-k matrix stored in *interpolative* form (k of its rows, and the other m − k rows as
combinations of those: :class:`~efedllm.compression.lowrank.InterpolativeLinear`) needs only
``k·(m + n − k)`` numbers, which is m·n exactly at full rank: low rank never costs more than dense,
and a ratio buys a higher rank (at c = 0.8 a 1536 × 576 matrix keeps rank 417 instead of 334).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence


class FactorForm(str, enum.Enum):
    """How a rank-k matrix is stored: eq. 9's ``U_k, Σ_k, V_kᵀ`` or the interpolative ``rows, mix`` form."""

    SVD = "svd"  # k·(m + n + 1) numbers (the paper's)
    INTERPOLATIVE = "interpolative"  # k·(m + n − k) numbers


def _check_dimensions(m: int, n: int) -> None:
    for name, value in (("m", m), ("n", n)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"matrix dimension {name} must be a positive integer, got {value!r}")


def _check_rank(m: int, n: int, k: int) -> None:
    _check_dimensions(m, n)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= min(m, n):
        raise ValueError(f"rank must be an integer in [0, {min(m, n)}] for a {m} x {n} matrix, got {k!r}")


def parameter_count(m: int, n: int, k: int) -> int:
    """Eq. 9: numbers stored by a rank-k truncated SVD of an m × n matrix, ``k·(m + n + 1)``."""
    _check_rank(m, n, k)
    return k * (m + n + 1)


def interpolative_parameter_count(m: int, n: int, k: int) -> int:
    """Numbers stored by a rank-k m × n matrix in interpolative form: ``k·n + (m − k)·k``."""
    _check_rank(m, n, k)
    return k * (m + n - k)


def factor_parameter_count(m: int, n: int, k: int, form: FactorForm | str = FactorForm.SVD) -> int:
    """Numbers stored by a rank-k m × n matrix in ``form`` (bias excluded)."""
    if FactorForm(form) is FactorForm.INTERPOLATIVE:
        return interpolative_parameter_count(m, n, k)
    return parameter_count(m, n, k)


def compression_ratio(m: int, n: int, k: int) -> float:
    """Eq. 10: ``k·(m + n + 1) / (m·n)``; above 1 the factors are bigger than the dense matrix."""
    return parameter_count(m, n, k) / (m * n)


def break_even_rank(m: int, n: int) -> int:
    """The largest rank whose factors are strictly smaller than the dense matrix (may be 0)."""
    _check_dimensions(m, n)
    return min((m * n - 1) // (m + n + 1), min(m, n))


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Eq. 15: ``k̂ = ⌊m·n·c / (m + n + 1)⌋``, clipped to [1, min(m, n)].

    At least rank 1 is kept (a rank-0 layer outputs zeros); a ratio past break-even gives full
    rank, and callers decide whether to keep such a matrix dense instead.
    """
    _check_dimensions(m, n)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"compression ratio must be in (0, 1], got {ratio!r}")
    # a tiny epsilon keeps exact products (e.g. c·mn = 3·(m+n+1)) from flooring one below
    rank = int(m * n * ratio / (m + n + 1) + 1e-9)
    return max(1, min(rank, min(m, n)))


def interpolative_rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """The largest k in [1, min(m, n)] with ``k·(m + n − k) ≤ c·m·n`` (the interpolative form's eq. 15)."""
    rank_for_ratio(m, n, ratio)  # validates m, n and the ratio
    s, budget = m + n, m * n * ratio * (1 + 1e-12)
    rank = int((s - (s * s - 4 * budget) ** 0.5) / 2) if s * s >= 4 * budget else min(m, n)  # smaller root of k² − s·k + budget
    while rank < min(m, n) and interpolative_parameter_count(m, n, rank + 1) <= budget:
        rank += 1
    while rank > 1 and interpolative_parameter_count(m, n, rank) > budget:
        rank -= 1
    return max(1, min(rank, min(m, n)))


def rank_for_energy(singular_values: Sequence[float], energy: float) -> int:
    """Eq. 12: the smallest k with ``Σ_{i≤k} σ_i² ≥ e · Σ σ_i²`` (singular values in descending order)."""
    if not isinstance(energy, (int, float)) or isinstance(energy, bool) or not 0.0 < energy <= 1.0:
        raise ValueError(f"retained energy must be in (0, 1], got {energy!r}")
    squares = [float(value) ** 2 for value in singular_values]
    if not squares:
        raise ValueError("rank_for_energy needs at least one singular value")
    if any(a < b for a, b in zip(squares, squares[1:])) or squares[-1] < 0:
        raise ValueError("singular values must be non-negative and in descending order")
    total = sum(squares)
    if total == 0.0:
        return 1
    target = energy * total * (1 - 1e-12)  # round-off must not push e = 1 past the last value
    cumulative = 0.0
    for index, square in enumerate(squares, start=1):
        cumulative += square
        if cumulative >= target:
            return index
    return len(squares)


def retained_energy(singular_values: Sequence[float], k: int) -> float:
    """The fraction of ``Σ σ_i²`` held by the first k singular values."""
    squares = [float(value) ** 2 for value in singular_values]
    if not 0 <= k <= len(squares):
        raise ValueError(f"rank must be in [0, {len(squares)}], got {k}")
    total = sum(squares)
    return 1.0 if total == 0.0 else sum(squares[:k]) / total


def stored_bytes(m: int, n: int, k: int | None, element_bytes: int = 4, form: FactorForm | str = FactorForm.SVD) -> int:
    """Bytes of a matrix kept dense (``k is None``: m·n) or as rank-k factors in ``form`` (default eq. 9's)."""
    _check_dimensions(m, n)
    count = m * n if k is None else factor_parameter_count(m, n, k, form)
    return count * element_bytes
