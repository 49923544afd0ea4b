"""Linear layers stored as rank-k factors: two thin matmuls instead of one dense one.

:class:`LowRankLinear` is eq. 9's form, ``y = U · (S ⊙ (Vh · x)) + b`` with U [m, k], S [k],
Vh [k, n]: ``k·(m + n + 1)`` numbers and about ``2·k·(m + n)`` FLOPs per token, against ``m·n``
and ``2·m·n`` dense. Whitened truncation (``efedllm.compression.whitening``) produces a Vh whose
rows are not orthonormal; the layer does not care.

:class:`InterpolativeLinear` stores the same rank-k matrix W' in interpolative (skeleton) form:
k of its rows R = W'[I] [k, n], and the other rows as combinations of those, W'[not I] = B·R with
B [m−k, k]. That is ``k·(m + n − k)`` numbers and as many multiply-adds per token, m·n at full rank,
so a low-rank matrix is never bigger than the dense one. I is chosen by LU with partial pivoting
of U_k (rows of U_k that span it well, so that B stays bounded); the form is exact up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from efedllm.compression.rank import FactorForm, interpolative_parameter_count, parameter_count
from efedllm.compression.svd import SvdAlgorithm, SvdFactors, truncated_svd


class LowRankLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear(in_features=n, out_features=m)`` of rank k."""

    def __init__(self, factors: SvdFactors, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        m, n = factors.shape
        if bias is not None and bias.shape != (m,):
            raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
        self.in_features, self.out_features, self.rank = n, m, factors.rank
        self.U = nn.Parameter(factors.U.detach().clone(), requires_grad=False)  # [m, k]
        self.S = nn.Parameter(factors.S.detach().clone(), requires_grad=False)  # [k]
        self.Vh = nn.Parameter(factors.Vh.detach().clone(), requires_grad=False)  # [k, n]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, algorithm: SvdAlgorithm | str = SvdAlgorithm.EXACT
    ) -> LowRankLinear:
        """Plain truncated SVD of ``linear.weight`` (computed in float64, stored in its dtype)."""
        weight = linear.weight.detach()
        factors = truncated_svd(weight.double(), rank, algorithm)
        return cls(cast_factors(factors, weight.dtype), linear.bias)

    @property
    def factors(self) -> SvdFactors:
        return SvdFactors(self.U.detach(), self.S.detach(), self.Vh.detach())

    @property
    def parameter_count(self) -> int:
        """Eq. 9 (plus the bias, if any)."""
        bias = 0 if self.bias is None else self.out_features
        return parameter_count(self.out_features, self.in_features, self.rank) + bias

    @property
    def nbytes(self) -> int:
        return sum(parameter.numel() * parameter.element_size() for parameter in self.parameters())

    def dense_weight(self) -> torch.Tensor:
        """The reconstructed ``U·diag(S)·Vh`` [m, n]."""
        return self.factors.reconstruct()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [..., n] -> [..., k] -> [..., m]
        return F.linear(F.linear(hidden, self.Vh) * self.S, self.U, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class InterpolativeLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear(in_features=n, out_features=m)`` of rank k, in interpolative form.

    Parameters: ``rows`` [k, n] (rows ``order[:k]`` of W'), ``mix`` [m−k, k] (rows ``order[k:]`` as
    combinations of ``rows``); buffer ``order`` [m], a permutation of 0..m−1.
    """

    def __init__(self, rows: torch.Tensor, mix: torch.Tensor, order: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        k, n = rows.shape
        m = k + mix.shape[0]
        if mix.dim() != 2 or mix.shape[1] != k:
            raise ValueError(f"mix must have shape [m - k, {k}], got {tuple(mix.shape)}")
        if order.shape != (m,) or not torch.equal(torch.sort(order.long()).values, torch.arange(m)):
            raise ValueError(f"order must be a permutation of 0..{m - 1}")
        if bias is not None and bias.shape != (m,):
            raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
        self.in_features, self.out_features, self.rank = n, m, k
        self.rows = nn.Parameter(rows.detach().clone(memory_format=torch.contiguous_format), requires_grad=False)  # [k, n]
        self.mix = nn.Parameter(mix.detach().clone(memory_format=torch.contiguous_format), requires_grad=False)  # [m-k, k]; contiguous: a received copy must compute bit-identically
        self.register_buffer("order", order.detach().long().clone())  # [m]
        self.register_buffer("restore", torch.argsort(self.order), persistent=False)  # output j is row restore[j] of [rows; mix·rows]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_factors(cls, factors: SvdFactors, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> InterpolativeLinear:
        """The interpolative form of ``U·diag(S)·Vh`` (computed in float64, stored in ``dtype``, default U's)."""
        dtype = dtype or factors.U.dtype
        U, S, Vh = (part.double() for part in (factors.U, factors.S, factors.Vh))
        k = factors.rank
        permutation, lower, _ = torch.linalg.lu(U)  # U = P·L·Ũ, L [m, k] unit lower trapezoidal, |L| <= 1
        order = permutation.argmax(dim=0)  # row i of Pᵀ·U is U[order[i]]
        # rows order[k:] of U are L21·L11⁻¹ times rows order[:k]
        mix = torch.linalg.solve_triangular(lower[:k], lower[k:], upper=False, left=False, unitriangular=True)  # [m-k, k]
        rows = (U[order[:k]] * S) @ Vh  # [k, n]
        return cls(rows.to(dtype), mix.to(dtype), order, bias)

    @property
    def parameter_count(self) -> int:
        """``k·(m + n − k)`` (plus the bias, if any)."""
        bias = 0 if self.bias is None else self.out_features
        return interpolative_parameter_count(self.out_features, self.in_features, self.rank) + bias

    @property
    def nbytes(self) -> int:
        return linear_nbytes(self)

    def dense_weight(self) -> torch.Tensor:
        """The reconstructed W' [m, n]."""
        stacked = torch.cat([self.rows, self.mix @ self.rows])  # [m, n], rows in ``order``
        return stacked.index_select(0, self.restore)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [..., n] -> skeleton outputs [..., k] -> all outputs [..., m] in ``order`` -> natural order
        skeleton = F.linear(hidden, self.rows)
        stacked = torch.cat([skeleton, F.linear(skeleton, self.mix)], dim=-1)
        output = stacked.index_select(-1, self.restore)
        return output if self.bias is None else output + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, form=interpolative"


def cast_factors(factors: SvdFactors, dtype: torch.dtype) -> SvdFactors:
    return SvdFactors(factors.U.to(dtype), factors.S.to(dtype), factors.Vh.to(dtype))


def linear_nbytes(module: nn.Module) -> int:
    """Bytes of a projection's parameters and persistent buffers, dense or low-rank."""
    persistent = module.state_dict()
    return sum(tensor.numel() * tensor.element_size() for tensor in persistent.values())


def low_rank_module(factors: SvdFactors, bias: torch.Tensor | None, dtype: torch.dtype, form: FactorForm | str) -> nn.Module:
    """A LowRankLinear (eq. 9's form) or an InterpolativeLinear of ``factors``, stored in ``dtype``."""
    if FactorForm(form) is FactorForm.INTERPOLATIVE:
        return InterpolativeLinear.from_factors(factors, bias, dtype)
    return LowRankLinear(cast_factors(factors, dtype), bias)
