"""Truncated SVD, exact (``torch.linalg.svd``) or randomised (Halko, Martinsson & Tropp 2011).

The paper (§4.2) cites a fast SVD (Xu et al. 2023); the randomised range finder is the standard
one: sketch ``W·Ω`` with k + p Gaussian columns (oversampling p), sharpen the spectrum with q
power iterations (re-orthonormalised each time, which keeps float32 stable), then take the exact
SVD of the small ``Qᵀ·W``. Its error is within a small factor of the optimal rank-k error; tests
compare both against the exact truncation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from efedllm.compression.rank import parameter_count


class SvdAlgorithm(str, enum.Enum):
    EXACT = "exact"
    RANDOMIZED = "randomized"


@dataclass(frozen=True)
class SvdFactors:
    """``W ≈ U · diag(S) · Vh`` with U [m, k], S [k] (descending), Vh [k, n]."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.Vh.shape[1]

    @property
    def parameter_count(self) -> int:
        """Eq. 9: ``k·(m + n + 1)``."""
        return parameter_count(*self.shape, self.rank)

    def reconstruct(self) -> torch.Tensor:
        return (self.U * self.S) @ self.Vh


def _check_matrix(matrix: torch.Tensor, rank: int) -> None:
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got {getattr(matrix, 'shape', type(matrix))}")
    if not matrix.is_floating_point():
        raise ValueError(f"expected a floating-point matrix, got dtype {matrix.dtype}")
    if not torch.isfinite(matrix).all():
        raise ValueError("matrix contains NaN or infinite values")
    if not isinstance(rank, int) or not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"rank must be in [1, {min(matrix.shape)}] for shape {tuple(matrix.shape)}, got {rank!r}")


def exact_svd(matrix: torch.Tensor, rank: int) -> SvdFactors:
    _check_matrix(matrix, rank)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return SvdFactors(U[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous())


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    oversample: int = 10,
    power_iterations: int = 2,
    generator: torch.Generator | None = None,
) -> SvdFactors:
    """Halko–Martinsson–Tropp: range finder with oversampling and power iterations, then a small exact SVD."""
    _check_matrix(matrix, rank)
    if oversample < 0 or power_iterations < 0:
        raise ValueError("oversample and power_iterations must be non-negative")
    m, n = matrix.shape
    sketch = min(rank + oversample, m, n)
    if sketch == min(m, n):  # the sketch would span everything: the exact SVD is cheaper
        return exact_svd(matrix, rank)
    omega = torch.randn(n, sketch, generator=generator, dtype=matrix.dtype, device=matrix.device)
    Q, _ = torch.linalg.qr(matrix @ omega)  # [m, sketch]
    for _ in range(power_iterations):
        Z, _ = torch.linalg.qr(matrix.T @ Q)  # [n, sketch]
        Q, _ = torch.linalg.qr(matrix @ Z)
    U_small, S, Vh = torch.linalg.svd(Q.T @ matrix, full_matrices=False)  # [sketch, n]
    U = Q @ U_small
    return SvdFactors(U[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous())


def truncated_svd(
    matrix: torch.Tensor,
    rank: int,
    algorithm: SvdAlgorithm | str = SvdAlgorithm.EXACT,
    oversample: int = 10,
    power_iterations: int = 2,
    generator: torch.Generator | None = None,
) -> SvdFactors:
    """The rank-k truncated SVD of ``matrix`` [m, n] by the chosen algorithm."""
    algorithm = SvdAlgorithm(algorithm)
    if algorithm is SvdAlgorithm.EXACT:
        return exact_svd(matrix, rank)
    return randomized_svd(matrix, rank, oversample, power_iterations, generator)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values, descending (for the energy rule and the allocation)."""
    _check_matrix(matrix, 1)
    return torch.linalg.svdvals(matrix)
