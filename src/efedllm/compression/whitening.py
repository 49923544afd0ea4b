"""Activation-aware (whitened) truncation, as in SVD-LLM (Wang et al. 2024).

Plain truncation minimises ``‖W − W'‖_F``; what matters is the layer's output on real inputs,
``‖X·(W − W')ᵀ‖_F`` for inputs X [N, n]. With the Gram matrix ``G = XᵀX = S·Sᵀ`` (S its lower
Cholesky factor) that error equals ``‖(W − W')·S‖_F``, so the optimal rank-k W' is the truncated
SVD of ``W·S`` with ``S⁻¹`` folded back: ``W' = U_k Σ_k (V_kᵀ S⁻¹)``. The dropped whitened
singular values are exactly the output error: ``‖X(W − W')ᵀ‖² = Σ_{i>k} σ_i(W·S)²``.

Call order: attach a :class:`GramCollector` to the projections, run calibration inputs through
the model, ``close()`` it, then :func:`whitening_factor` and :func:`whitened_svd` per matrix.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from efedllm.compression.svd import SvdAlgorithm, SvdFactors, truncated_svd

# relative ridge added to G's diagonal when it is singular (too few or degenerate inputs)
RIDGE_STEPS: tuple[float, ...] = (0.0, 1e-8, 1e-6, 1e-4, 1e-2, 1e-1)


class GramCollector:
    """Accumulates ``XᵀX`` (float64 sums of float32 batch products) of the inputs of each named ``nn.Linear`` with forward pre-hooks.

    Modules that share an input tensor (q/k/v, gate/up) share one Gram matrix, computed once.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.grams: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in modules.items()]
        self._last: tuple[torch.Tensor, str] | None = None  # a strong reference, so identity is reliable

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            inputs = args[0]
            if self._last is not None and self._last[0] is inputs:
                self.grams[name] = self.grams[self._last[1]]  # same tensor as the previous module: share it
                self.tokens[name] = self.tokens[self._last[1]]
                return
            flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()  # [N, n]
            # float32 products per call (4x faster than float64 on CPU), float64 running sum
            self.grams[name] = self.grams.get(name, 0) + (flat.T @ flat).double()
            self.tokens[name] = self.tokens.get(name, 0) + flat.shape[0]
            self._last = (inputs, name)

        return hook

    def close(self) -> dict[str, torch.Tensor]:
        for handle in self._handles:
            handle.remove()
        self._handles, self._last = [], None
        return self.grams


def whitening_factor(gram: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor S of ``G + ridge·mean(diag G)·I``, with the smallest ridge that works."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"Gram matrix must be square, got shape {tuple(gram.shape)}")
    if not torch.isfinite(gram).all():
        raise ValueError("Gram matrix contains NaN or infinite values (bad calibration inputs)")
    gram = gram.double()
    scale = gram.diagonal().mean().clamp_min(1e-30)
    identity = torch.eye(gram.shape[0], dtype=gram.dtype)
    for ridge in RIDGE_STEPS:
        factor, info = torch.linalg.cholesky_ex(gram + ridge * scale * identity)
        if int(info) == 0 and factor.diagonal().min() > 1e-12 * scale.sqrt():
            return factor
    raise ValueError("Gram matrix is not positive definite even with a ridge of 10% of its mean diagonal")


def whitened_singular_values(weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Singular values of ``W·S`` (float64): their tail is the output error of truncation."""
    return torch.linalg.svdvals(weight.double() @ factor)


def whitened_svd(
    weight: torch.Tensor,
    factor: torch.Tensor,
    rank: int,
    algorithm: SvdAlgorithm | str = SvdAlgorithm.EXACT,
) -> SvdFactors:
    """Rank-k factors of W minimising ``‖(W − W')·S‖_F``: SVD of ``W·S``, then ``Vh ← Vh·S⁻¹``."""
    whitened = truncated_svd(weight.double() @ factor, rank, algorithm)
    # Vh S^-1 = (S^-T Vh^T)^T: one triangular solve with S^T (upper)
    unwhitened = torch.linalg.solve_triangular(factor.T, whitened.Vh.T, upper=True).T  # [k, n]
    return SvdFactors(whitened.U, whitened.S, unwhitened)


def output_error(weight: torch.Tensor, approximation: torch.Tensor, inputs: Iterable[torch.Tensor]) -> float:
    """``‖X·(W − W')ᵀ‖_F²`` summed over batches of inputs [..., n] (for tests and reports)."""
    difference = (weight - approximation).double()
    return float(sum(((batch.double() @ difference.T) ** 2).sum() for batch in inputs))
