"""Global rank allocation under one parameter budget (paper eq. 13's view).

Eq. 13 makes a compressed model's accuracy a product over its layers, so the log-accuracy is a
sum and the budget should go where a rank buys the most. Each matrix j offers options: rank k
(cost ``k·(m+n+1)`` in eq. 9's form, ``k·(m+n−k)`` in the interpolative one; loss
``w_j · Σ_{i>k} σ_i²``) or, when allowed, staying dense (cost ``m·n``, loss 0; in the interpolative
form it replaces full rank, which costs the same). With whitened singular values the tail is the exact output error on the calibration
inputs; ``w_j = 1 / Σ σ_i²`` makes it a relative error, comparable across matrices.

The allocation minimises ``Σ_j loss_j + λ·Σ_j cost_j`` per matrix independently, bisects λ for
the smallest total cost within budget, then spends what is left greedily on the options with the
best loss drop per parameter. Pure: tensors in, ranks out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from efedllm.compression.rank import FactorForm, interpolative_rank_for_ratio, rank_for_ratio

BISECTION_STEPS = 100


@dataclass(frozen=True)
class MatrixSpectrum:
    """One matrix to allocate: shape [m, n], singular values (descending) and loss weight."""

    m: int
    n: int
    singular_values: torch.Tensor
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.singular_values.dim() != 1 or self.singular_values.numel() != min(self.m, self.n):
            raise ValueError(f"a {self.m} x {self.n} matrix needs {min(self.m, self.n)} singular values")
        if not self.weight >= 0:
            raise ValueError(f"loss weight must be non-negative, got {self.weight}")


@dataclass(frozen=True)
class _Options:
    costs: torch.Tensor  # [options]: rank 1..r, then dense (if allowed)
    losses: torch.Tensor  # [options]
    ranks: list[int | None]


def _options(spectrum: MatrixSpectrum, allow_dense: bool, form: FactorForm = FactorForm.SVD) -> _Options:
    squares = spectrum.singular_values.double() ** 2
    tail = squares.flip(0).cumsum(0).flip(0)  # tail[i] = sum of squares from index i
    tail = torch.cat([tail[1:], tail.new_zeros(1)])  # loss of keeping rank i+1
    ranks = torch.arange(1, squares.numel() + 1, dtype=torch.float64)
    if form is FactorForm.INTERPOLATIVE:
        costs = ranks * (spectrum.m + spectrum.n - ranks)
    else:
        costs = ranks * (spectrum.m + spectrum.n + 1)
    losses = tail * spectrum.weight
    rank_list: list[int | None] = list(range(1, squares.numel() + 1))
    if allow_dense and form is FactorForm.INTERPOLATIVE and squares.numel() > 1:
        costs, losses, rank_list = costs[:-1], losses[:-1], rank_list[:-1]  # full rank costs m·n: keep it dense instead
    if allow_dense:
        costs = torch.cat([costs, costs.new_tensor([spectrum.m * spectrum.n])])
        losses = torch.cat([losses, losses.new_zeros(1)])
        rank_list.append(None)
    return _Options(costs, losses, rank_list)


def _choose(options: list[_Options], multiplier: float) -> list[int]:
    return [int(torch.argmin(option.losses + multiplier * option.costs)) for option in options]


def _total_cost(options: list[_Options], choice: list[int]) -> float:
    return float(sum(option.costs[index] for option, index in zip(options, choice)))


def allocate_ranks(
    spectra: Sequence[MatrixSpectrum], budget: float, allow_dense: bool = True, form: FactorForm | str = FactorForm.SVD
) -> list[int | None]:
    """Per matrix: a rank, or None for "keep dense", with total cost in ``form`` ≤ ``budget`` parameters.

    Raises ValueError when even rank 1 everywhere exceeds the budget.
    """
    if not spectra:
        return []
    options = [_options(spectrum, allow_dense, FactorForm(form)) for spectrum in spectra]
    minimum = _total_cost(options, [0] * len(options))
    if budget < minimum:
        raise ValueError(f"budget of {budget:.0f} parameters is below the rank-1 minimum of {minimum:.0f}")
    low, high = 0.0, 1.0
    while _total_cost(options, _choose(options, high)) > budget:
        high *= 4.0
    for _ in range(BISECTION_STEPS):  # smallest multiplier whose choice fits
        middle = (low + high) / 2
        if _total_cost(options, _choose(options, middle)) > budget:
            low = middle
        else:
            high = middle
    choice = _fill_greedily(options, _choose(options, high), budget)
    return [option.ranks[index] for option, index in zip(options, choice)]


def _fill_greedily(options: list[_Options], choice: list[int], budget: float) -> list[int]:
    """Spend the leftover budget on single upgrades with the best loss drop per parameter."""
    choice = list(choice)
    spent = _total_cost(options, choice)
    while True:
        best, best_rate = None, 0.0
        for j, option in enumerate(options):
            current = choice[j]
            extra = option.costs[current + 1 :] - option.costs[current]
            gain = option.losses[current] - option.losses[current + 1 :]
            affordable = (extra <= budget - spent) & (extra > 0) & (gain > 0)
            if affordable.any():
                rates = torch.where(affordable, gain / extra.clamp_min(1e-30), torch.zeros_like(gain))
                index = int(torch.argmax(rates))
                if float(rates[index]) > best_rate:
                    best, best_rate = (j, current + 1 + index), float(rates[index])
        if best is None:
            return choice
        j, index = best
        spent += float(options[j].costs[index] - options[j].costs[choice[j]])
        choice[j] = index


def uniform_ranks(shapes: Sequence[tuple[int, int]], ratio: float, form: FactorForm | str = FactorForm.SVD) -> list[int]:
    """Eq. 15 applied to every matrix alike (the paper's rule, ``⌊m·n·c / (m+n+1)⌋``), or its interpolative analogue."""
    rule = interpolative_rank_for_ratio if FactorForm(form) is FactorForm.INTERPOLATIVE else rank_for_ratio
    return [rule(m, n, ratio) for m, n in shapes]
