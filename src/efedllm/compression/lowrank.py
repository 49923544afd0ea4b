"""A linear layer stored as eq. 9's factors: two thin matmuls instead of one dense one.

``y = U · (S ⊙ (Vh · x)) + b`` with U [m, k], S [k], Vh [k, n]: ``k·(m + n + 1)`` numbers and
about ``2·k·(m + n)`` FLOPs per token, against ``m·n`` and ``2·m·n`` dense. Whitened truncation
(``efedllm.compression.whitening``) produces a Vh whose rows are not orthonormal; the layer does
not care.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from efedllm.compression.rank import parameter_count
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


def cast_factors(factors: SvdFactors, dtype: torch.dtype) -> SvdFactors:
    return SvdFactors(factors.U.to(dtype), factors.S.to(dtype), factors.Vh.to(dtype))


def linear_nbytes(module: nn.Module) -> int:
    """Bytes of a projection's parameters, dense or low-rank."""
    return sum(parameter.numel() * parameter.element_size() for parameter in module.parameters())
