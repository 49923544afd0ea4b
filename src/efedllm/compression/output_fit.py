"""Dense-target truncation: fit a compressed projection's output to the *dense* model's output.

Sequential calibration feeds a projection the inputs ``X_c`` [N, n] produced by the already
compressed layers before it. Whitening alone minimises ``‖X_c·(W − W')ᵀ‖_F``: it reproduces what W
would do on the drifted inputs and leaves the drift uncorrected. With the dense model's inputs
``X_o`` for the same tokens the target is the dense output ``Y = X_o·Wᵀ``:

    min over rank-k W' of ‖X_c·W'ᵀ − X_o·Wᵀ‖_F

This is reduced-rank regression (and the SVD-LLM "parameter update", solved for both factors at
once). With ``G = X_cᵀX_c = S·Sᵀ`` (S lower Cholesky) and the least-squares map
``W_ls = W·G_oc·G⁻¹`` (``G_oc = X_oᵀX_c``), ``‖X_c W'ᵀ − Y‖² = ‖X_c W_lsᵀ − Y‖² + ‖(W_ls − W')·S‖²``,
so the optimum is the whitened truncation of W_ls: the SVD of ``W_ls·S = W·G_oc·S⁻ᵀ``, then
``Vh ← Vh·S⁻¹``. When ``X_o = X_c`` it is exactly :func:`~efedllm.compression.whitening.whitened_svd`.

Call order: attach an :class:`InputRecorder` to the projections of the dense layer and run the
dense inputs through it, attach another to the compressed layer's projections and run the
compressed inputs, ``close()`` both, then :func:`paired_grams` and :func:`output_fit_svd` per matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from efedllm.compression.svd import SvdAlgorithm, SvdFactors, truncated_svd

GRAM_CHUNK = 4096  # tokens per float32 product; sums are float64


class InputRecorder:
    """Records the inputs [N, n] (float32, in call order) of each named module with forward pre-hooks.

    Modules that receive the same tensor (q/k/v, gate/up) share one recording.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self._chunks: dict[str, list[torch.Tensor]] = {}
        self._alias: dict[str, str] = {}
        self._last: tuple[torch.Tensor, str] | None = None  # a strong reference, so identity is reliable
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            inputs = args[0]
            if self._last is not None and self._last[0] is inputs:
                self._alias[name] = self._alias.get(self._last[1], self._last[1])
                return
            self._chunks.setdefault(name, []).append(inputs.detach().reshape(-1, inputs.shape[-1]).float())
            self._last = (inputs, name)

        return hook

    def close(self) -> dict[str, torch.Tensor]:
        """Removes the hooks; returns each module's inputs [N, n], concatenated over calls."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._last = [], None
        inputs = {name: torch.cat(chunks) for name, chunks in self._chunks.items()}
        return inputs | {name: inputs[source] for name, source in self._alias.items()}


def paired_grams(compressed: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X_cᵀX_c, X_cᵀX_o)`` [n, n] float64, from row-aligned inputs [N, n] (same tokens, same order)."""
    if compressed.dim() != 2 or compressed.shape != dense.shape:
        raise ValueError(f"paired inputs must be two [N, n] tensors of one shape, got {tuple(compressed.shape)} and {tuple(dense.shape)}")
    n = compressed.shape[1]
    same = dense is compressed  # plain whitening: the cross Gram is the Gram, computed once
    gram, cross = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, compressed.shape[0], GRAM_CHUNK):
        block_c = compressed[start : start + GRAM_CHUNK].float()
        gram += (block_c.T @ block_c).double()
        if not same:
            cross += (block_c.T @ dense[start : start + GRAM_CHUNK].float()).double()
    return gram, (gram if same else cross)


def output_fit_svd(
    weight: torch.Tensor,
    factor: torch.Tensor,
    cross_gram: torch.Tensor,
    rank: int,
    algorithm: SvdAlgorithm | str = SvdAlgorithm.EXACT,
) -> SvdFactors:
    """Rank-k factors minimising ``‖X_c·W'ᵀ − X_o·Wᵀ‖_F``.

    ``weight`` W [m, n]; ``factor`` S, the lower Cholesky factor of ``X_cᵀX_c`` (see
    :func:`~efedllm.compression.whitening.whitening_factor`); ``cross_gram`` ``X_cᵀX_o`` [n, n].
    """
    n = weight.shape[1]
    if factor.shape != (n, n) or cross_gram.shape != (n, n):
        raise ValueError(f"a weight with {n} inputs needs [{n}, {n}] factor and cross Gram, got {tuple(factor.shape)} and {tuple(cross_gram.shape)}")
    # (W·G_oc·S⁻ᵀ)ᵀ = S⁻¹·G_co·Wᵀ: one triangular solve
    target = torch.linalg.solve_triangular(factor, cross_gram.double() @ weight.double().T, upper=False).T  # [m, n]
    whitened = truncated_svd(target, rank, algorithm)
    unwhitened = torch.linalg.solve_triangular(factor.T, whitened.Vh.T, upper=True).T  # Vh·S⁻¹ [k, n]
    return SvdFactors(whitened.U, whitened.S, unwhitened)


def fit_error(weight: torch.Tensor, approximation: torch.Tensor, compressed: torch.Tensor, dense: torch.Tensor) -> float:
    """``‖X_c·W'ᵀ − X_o·Wᵀ‖_F²`` (for tests and reports)."""
    return float(((compressed.double() @ approximation.double().T - dense.double() @ weight.double().T) ** 2).sum())
