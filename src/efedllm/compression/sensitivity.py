"""Loss sensitivity of each projection's output, to weigh rank allocation by what truncation costs.

The whitened tail ``Σ_{i>k} σ_i(W·S)²`` is the squared output error ``Σ_t ‖Δy_t‖²`` of truncating
a projection on the calibration tokens. What it costs in loss depends on where the projection
sits: to second order (Fisher), ``ΔL ≈ ½·Σ_t (g_tᵀ Δy_t)²`` with ``g_t = ∂L/∂y_t``; taking the error
direction as isotropic, ``E[(gᵀΔy)²] ≈ ‖g‖²·‖Δy‖² / m``. So a projection's allocation weight is its
mean squared output gradient per output entry, ``Σ_t ‖g_t‖² / (N·m)``, measured with one backward
pass of the language-model loss through the dense model (gradients w.r.t. activations only).

Call order: :func:`output_sensitivities` with a loss function over token windows and the
projections; pass the result to ``compress_layers(..., sensitivities=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

# token windows [b, T] -> scalar loss (summed NLL), computed with autograd enabled
LossFunction = Callable[[torch.Tensor], torch.Tensor]


def output_sensitivities(loss_of: LossFunction, modules: Sequence[nn.Module], token_windows: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Mean squared loss gradient per output entry of each module (order of ``modules``)."""
    if token_windows.dim() != 2 or token_windows.numel() == 0:
        raise ValueError(f"token windows must be a non-empty [b, T] tensor, got {tuple(token_windows.shape)}")
    energy = [0.0] * len(modules)
    handles = [module.register_forward_hook(_gradient_hook(energy, index)) for index, module in enumerate(modules)]
    try:
        with torch.enable_grad():
            for batch in token_windows.split(batch_size):
                loss_of(batch).backward()
    finally:
        for handle in handles:
            handle.remove()
    tokens = token_windows.numel()
    return [value / (tokens * module.weight.shape[0]) for value, module in zip(energy, modules)]


def _gradient_hook(energy: list[float], index: int):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(lambda gradient: energy.__setitem__(index, energy[index] + float((gradient.double() ** 2).sum())))

    return hook


def language_model_loss(embed: Callable, body: Callable, logits_of: Callable) -> LossFunction:
    """Summed next-token NLL of windows [b, T], with the embeddings marked as requiring grad.

    Only activations need gradients: the weights stay frozen, so the backward pass is cheap.
    """

    def loss(windows: torch.Tensor) -> torch.Tensor:
        hidden = embed(windows).detach().requires_grad_(True)  # [b, T, H]
        logits = logits_of(body(hidden))[:, :-1]  # [b, T-1, V]
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum")

    return loss
