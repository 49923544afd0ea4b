"""Softmax verification by digit decomposition (paper §4.4, eqs. 18–22) on random scores."""

import numpy as np
import pytest
import torch

from efedllm.analysis import softmax_check as check
from efedllm.analysis.softmax_lookup import lookup_tables, quantised_shifts

CONFIGS = [
    check.SoftmaxCheckConfig(),
    check.SoftmaxCheckConfig(base=2, digits=24, fraction_bits=18),
    check.SoftmaxCheckConfig(base=256, digits=3, fraction_bits=20, table_bits=24),
    check.SoftmaxCheckConfig(base=10, digits=6, fraction_bits=12, server_dtype="float64"),
]


def _scores(heads=3, length=40, scale=3.0, seed=0, causal=True):
    generator = torch.Generator().manual_seed(seed)
    scores = scale * torch.randn(heads, length, length, generator=generator)  # [h, q, k]
    if causal:
        scores = scores.masked_fill(torch.triu(torch.ones(length, length, dtype=torch.bool), 1), float("-inf"))
    return scores


def test_tables_hold_the_exponential_of_each_digit():
    tables = lookup_tables(base=4, digits=3, fraction_bits=2, table_bits=52)
    place = torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64).reshape(3, 1)
    expected = torch.exp(-torch.arange(4.0, dtype=torch.float64).reshape(1, 4) * place / 4)  # [K, b]
    torch.testing.assert_close(torch.from_numpy(tables), expected, rtol=5e-16, atol=0)


def test_shift_makes_the_row_maximum_zero():
    shifts, finite = quantised_shifts(np.array([[0.5, -1.25, float("-inf"), 2.0]]), fraction_bits=2)
    assert shifts.tolist() == [[6, 13, 0, 0]] and finite.tolist() == [[True, True, False, True]]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"b{c.base}K{c.digits}f{c.fraction_bits}")
@pytest.mark.parametrize(("scale", "causal"), [(1.0, False), (4.0, True), (12.0, True)])
def test_decomposition_matches_torch_softmax_within_the_derived_bound(config, scale, causal):
    scores = _scores(scale=scale, causal=causal)
    error = (check.lookup_softmax(scores, config) - torch.softmax(scores.double(), dim=-1)).abs().max().item()
    assert error <= check.derive_error_bound(config, scores.shape[-1]).absolute


def test_bound_shrinks_with_more_fraction_bits():
    coarse = check.derive_error_bound(check.SoftmaxCheckConfig(base=16, digits=4, fraction_bits=12), 64)
    fine = check.derive_error_bound(check.SoftmaxCheckConfig(base=16, digits=6, fraction_bits=20), 64)
    assert fine.absolute < coarse.absolute


def test_split_across_worker_processes_is_bit_identical():
    scores = _scores(heads=4, length=33, seed=3)  # 132 rows: uneven chunks for 3 workers
    config = check.SoftmaxCheckConfig()
    single = check.lookup_softmax(scores, config, workers=1)
    with check.SoftmaxVerifier(config, workers=3) as verifier:
        assert torch.equal(verifier.probabilities(scores), single)
    assert torch.equal(check.lookup_softmax(scores, config, workers=2), single)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("config", CONFIGS[:3], ids=lambda c: f"b{c.base}K{c.digits}")
def test_honest_float32_server_is_never_flagged(seed, config):
    scores = _scores(heads=2, length=64, scale=1 + 3 * seed, seed=seed)
    result = check.verify_softmax(scores, torch.softmax(scores, dim=-1), config)
    assert result.passed and result.failed_rows == ()
    assert result.max_tolerance_ratio <= 1


def test_honest_float64_server_passes_a_float64_config():
    scores = _scores(length=50).double()
    config = check.SoftmaxCheckConfig(server_dtype="float64")
    assert check.verify_softmax(scores, torch.softmax(scores, dim=-1), config).passed


@pytest.mark.parametrize("causal", [True, False])
def test_each_tampering_is_caught(causal):
    scores = _scores(heads=2, length=48, seed=5, causal=causal)
    honest = torch.softmax(scores, dim=-1)
    generator = torch.Generator().manual_seed(0)
    tampered = {
        "permuted rows": check.tamper_permute_rows(honest, generator),
        "temperature": check.tamper_temperature(scores, 1.1),
        "dropped key": check.tamper_drop_key(honest, 0),
    }
    for name, probs in tampered.items():
        result = check.verify_softmax(scores, probs)
        assert not result.passed, name
        assert len(result.failed_rows) > 0 and result.row_failed.shape == scores.shape[:-1]


def test_failed_rows_name_the_tampered_row():
    scores = _scores(heads=1, length=10, seed=2, causal=False)
    probs = torch.softmax(scores, dim=-1)
    probs[0, 7] = torch.softmax(scores[0, 7] / 1.2, dim=-1)
    result = check.verify_softmax(scores, probs)
    assert result.failed_rows == ((0, 7),)


def test_mass_on_a_masked_key_fails():
    scores = _scores(heads=1, length=6, seed=1)
    probs = torch.softmax(scores, dim=-1)
    probs[0, 2] = torch.tensor([0.5, 0.25, 0.2, 0.05, 0.0, 0.0])  # key 3 is masked for query 2
    result = check.verify_softmax(scores, probs)
    assert (0, 2) in result.failed_rows


def test_non_finite_server_output_fails_the_row_instead_of_raising():
    scores = _scores(heads=1, length=5, seed=4, causal=False)
    probs = torch.softmax(scores, dim=-1)
    probs[0, 1, 2] = float("nan")
    assert check.verify_softmax(scores, probs).failed_rows == ((0, 1),)


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        (torch.tensor([[1.0, float("nan")]]), "NaN"),
        (torch.tensor([[1.0, float("inf")]]), r"\+inf"),
        (torch.tensor([[float("-inf"), float("-inf")], [0.0, 1.0]]), "fully masked"),
        (torch.tensor([1.0, 2.0]), "shape"),
        (torch.tensor([[1, 2]]), "floating-point"),
        (torch.tensor([[1e30, 0.0]]), "overflows"),
    ],
)
def test_bad_scores_are_named(scores, message):
    with pytest.raises(ValueError, match=message):
        check.lookup_softmax(scores)


def test_mismatched_server_shape_is_named():
    scores = _scores(heads=1, length=4)
    with pytest.raises(ValueError, match="server_probs"):
        check.verify_softmax(scores, torch.ones(1, 4, 5))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"base": 1}, "base"),
        ({"digits": 0}, "digits"),
        ({"table_bits": 60}, "table_bits"),
        ({"server_dtype": "int8"}, "server_dtype"),
        ({"base": 2, "digits": 10, "fraction_bits": 16}, "min_range"),
        ({"base": 2**16, "digits": 4}, "2\\*\\*62"),
    ],
)
def test_config_validation(options, message):
    with pytest.raises(ValueError, match=message):
        check.SoftmaxCheckConfig(**options)


def test_several_workers_need_start():
    verifier = check.SoftmaxVerifier(check.SoftmaxCheckConfig(), workers=2)
    with pytest.raises(RuntimeError, match="start"):
        verifier.probabilities(_scores(heads=1, length=4))
    with pytest.raises(ValueError, match="workers"):
        check.SoftmaxVerifier(check.SoftmaxCheckConfig(), workers=0)
