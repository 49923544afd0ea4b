import pytest
import torch

from efedllm.compression.allocation import MatrixSpectrum, allocate_ranks, uniform_ranks
from efedllm.compression.rank import parameter_count


def _cost(spectra, ranks):
    return sum(s.m * s.n if k is None else parameter_count(s.m, s.n, k) for s, k in zip(spectra, ranks))


def test_budget_goes_to_the_matrix_whose_spectrum_decays_slowly():
    flat = MatrixSpectrum(20, 20, torch.ones(20))
    steep = MatrixSpectrum(20, 20, 0.3 ** torch.arange(20, dtype=torch.float64))
    budget = 2 * parameter_count(20, 20, 4)
    ranks = allocate_ranks([flat, steep], budget, allow_dense=False)
    assert _cost([flat, steep], ranks) <= budget
    assert ranks[0] > ranks[1] >= 1
    assert _cost([flat, steep], ranks) > budget - 41  # the leftover is less than one rank step


def test_budget_is_respected_and_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    spectra = [
        MatrixSpectrum(6, 4, torch.sort(torch.rand(4, generator=generator), descending=True).values),
        MatrixSpectrum(5, 5, torch.sort(torch.rand(5, generator=generator), descending=True).values),
        MatrixSpectrum(3, 7, torch.sort(torch.rand(3, generator=generator), descending=True).values),
    ]
    budget = 60

    def loss(spectrum, k):
        squares = spectrum.singular_values.double() ** 2
        return 0.0 if k is None else float(squares[k:].sum())

    best = min(
        loss(spectra[0], a) + loss(spectra[1], b) + loss(spectra[2], c)
        for a in [*range(1, 5), None]
        for b in [*range(1, 6), None]
        for c in [*range(1, 4), None]
        if _cost(spectra, (a, b, c)) <= budget
    )
    ranks = allocate_ranks(spectra, budget)
    assert _cost(spectra, ranks) <= budget
    found = sum(loss(s, k) for s, k in zip(spectra, ranks))
    assert found <= best * 1.25 + 1e-12  # Lagrangian + greedy fill is near the optimum here


def test_dense_is_chosen_when_the_budget_allows_everything():
    spectra = [MatrixSpectrum(8, 8, torch.ones(8)), MatrixSpectrum(4, 8, torch.ones(4))]
    assert allocate_ranks(spectra, 64 + 32) == [None, None]
    ranks = allocate_ranks(spectra, 64 + 32, allow_dense=False)
    assert None not in ranks and _cost(spectra, ranks) <= 64 + 32
    assert (8 - ranks[0]) + (4 - ranks[1]) == 6  # six unit values dropped: the optimum


def test_too_small_budget_is_rejected():
    with pytest.raises(ValueError, match="budget"):
        allocate_ranks([MatrixSpectrum(8, 8, torch.ones(8))], 5)
    with pytest.raises(ValueError, match="singular values"):
        MatrixSpectrum(8, 8, torch.ones(7))


def test_uniform_ranks_are_eq15():
    assert uniform_ranks([(576, 576), (1536, 576)], 0.9) == [258, 376]
