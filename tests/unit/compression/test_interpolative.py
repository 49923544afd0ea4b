"""The interpolative (skeleton) storage form: exact up to rounding, k·(m+n−k) numbers, bad input refused."""

import pytest
import torch

from efedllm.compression.allocation import MatrixSpectrum, allocate_ranks, uniform_ranks
from efedllm.compression.lowrank import InterpolativeLinear, LowRankLinear, low_rank_module
from efedllm.compression.rank import (
    FactorForm,
    factor_parameter_count,
    interpolative_parameter_count,
    interpolative_rank_for_ratio,
    rank_for_ratio,
)
from efedllm.compression.svd import truncated_svd


def _factors(m: int, n: int, k: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=generator, dtype=torch.float64) * torch.linspace(1.0, 0.01, n, dtype=torch.float64)
    return truncated_svd(weight, k)


@pytest.mark.parametrize("m, n, k", [(48, 16, 7), (16, 48, 9), (32, 32, 20), (16, 48, 16), (48, 16, 16)])
def test_reconstructs_the_truncated_matrix_and_computes_its_outputs(m, n, k):
    factors = _factors(m, n, k)
    reference = factors.reconstruct()  # [m, n]
    bias = torch.randn(m, dtype=torch.float64)
    layer = InterpolativeLinear.from_factors(factors, bias, torch.float64)
    assert torch.allclose(layer.dense_weight(), reference, rtol=0, atol=1e-10 * float(reference.abs().max()))
    hidden = torch.randn(2, 5, n, dtype=torch.float64)
    assert torch.allclose(layer(hidden), hidden @ reference.T + bias, atol=1e-9)
    assert layer.parameter_count == k * (m + n - k) + m
    assert layer.rows.shape == (k, n) and layer.mix.shape == (m - k, k)


def test_float32_storage_matches_eq9_storage():
    factors = _factors(96, 40, 25)
    hidden = torch.randn(4, 40)
    svd_form = LowRankLinear(type(factors)(*(part.float() for part in (factors.U, factors.S, factors.Vh))))
    interpolative = low_rank_module(factors, None, torch.float32, "interpolative")
    assert isinstance(interpolative, InterpolativeLinear)
    assert torch.allclose(interpolative(hidden), svd_form(hidden), rtol=1e-4, atol=1e-5)
    assert interpolative.nbytes < svd_form.nbytes  # fewer numbers, even with the m row indices


def test_bad_parts_are_refused():
    rows, mix = torch.randn(3, 8), torch.randn(5, 3)
    with pytest.raises(ValueError, match="permutation"):
        InterpolativeLinear(rows, mix, torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]))
    with pytest.raises(ValueError, match="mix"):
        InterpolativeLinear(rows, torch.randn(5, 4), torch.arange(8))
    with pytest.raises(ValueError, match="bias"):
        InterpolativeLinear(rows, mix, torch.arange(8), torch.randn(7))


def test_rank_rule_is_the_largest_rank_within_the_ratio():
    for m, n, ratio in [(1536, 576, 0.8), (576, 576, 0.8), (576, 1536, 0.3), (64, 32, 1.0), (7, 5, 0.05)]:
        k = interpolative_rank_for_ratio(m, n, ratio)
        assert interpolative_parameter_count(m, n, k) <= ratio * m * n or k == 1
        assert k == min(m, n) or interpolative_parameter_count(m, n, k + 1) > ratio * m * n
    assert interpolative_rank_for_ratio(1536, 576, 0.8) == 417 and rank_for_ratio(1536, 576, 0.8) == 334
    assert factor_parameter_count(10, 20, 10, FactorForm.INTERPOLATIVE) == 10 * 20  # full rank costs what dense does
    assert factor_parameter_count(10, 20, 4, "svd") == 4 * 31
    assert uniform_ranks([(1536, 576)], 0.8, "interpolative") == [417]


def test_allocation_in_interpolative_costs_fits_the_budget_and_keeps_dense_instead_of_full_rank():
    generator = torch.Generator().manual_seed(0)
    spectra = [MatrixSpectrum(32, 16, torch.sort(torch.rand(16, generator=generator), descending=True).values) for _ in range(4)]
    budget = 0.7 * 4 * 32 * 16
    ranks = allocate_ranks(spectra, budget, form="interpolative")
    cost = sum(32 * 16 if rank is None else interpolative_parameter_count(32, 16, rank) for rank in ranks)
    assert cost <= budget and 16 not in ranks
    svd_ranks = allocate_ranks(spectra, budget, form="svd")
    kept = lambda chosen: sum(16 if rank is None else rank for rank in chosen)  # noqa: E731
    assert kept(ranks) > kept(svd_ranks)  # the same budget buys more rank
