import pytest
import torch

from efedllm.compression.svd import exact_svd
from efedllm.compression.whitening import GramCollector, output_error, whitened_singular_values, whitened_svd, whitening_factor


def _correlated_inputs(samples: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n, n, generator=generator, dtype=torch.float64) * (0.7 ** torch.arange(n, dtype=torch.float64))
    outliers = torch.ones(n, dtype=torch.float64)
    outliers[torch.randint(0, n, (3,), generator=generator)] = 20.0  # a few large channels, as in LLM activations
    return (torch.randn(samples, n, generator=generator, dtype=torch.float64) @ mixing.T) * outliers


@pytest.mark.parametrize("seed", range(12))
def test_whitened_truncation_is_never_worse_than_plain_on_calibration_inputs(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    m, n = int(torch.randint(8, 40, (1,), generator=generator)), int(torch.randint(8, 40, (1,), generator=generator))
    weight = torch.randn(m, n, generator=generator, dtype=torch.float64)
    inputs = _correlated_inputs(4 * n, n, seed)
    factor = whitening_factor(inputs.T @ inputs)
    for rank in range(1, min(m, n) + 1, 3):
        whitened = whitened_svd(weight, factor, rank).reconstruct()
        plain = exact_svd(weight, rank).reconstruct()
        assert output_error(weight, whitened, [inputs]) <= output_error(weight, plain, [inputs]) * (1 + 1e-9) + 1e-9


def test_dropped_whitened_values_are_the_output_error():
    inputs = _correlated_inputs(200, 16, 0)
    weight = torch.randn(10, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    factor = whitening_factor(inputs.T @ inputs)
    values = whitened_singular_values(weight, factor)
    approximation = whitened_svd(weight, factor, 4).reconstruct()
    assert output_error(weight, approximation, [inputs]) == pytest.approx(float((values[4:] ** 2).sum()), rel=1e-6)


def test_singular_gram_falls_back_to_a_ridge():
    inputs = torch.randn(3, 10, dtype=torch.float64)  # rank 3 < 10
    factor = whitening_factor(inputs.T @ inputs)
    assert torch.isfinite(factor).all() and factor.diagonal().min() > 0
    with pytest.raises(ValueError, match="NaN"):
        whitening_factor(torch.full((2, 2), float("nan")))


def test_gram_collector_shares_one_input_and_counts_tokens():
    first, second = torch.nn.Linear(6, 3), torch.nn.Linear(6, 2)
    collector = GramCollector({"first": first, "second": second})
    batches = [torch.randn(2, 5, 6) for _ in range(2)]
    for batch in batches:
        first(batch), second(batch)
    other = torch.nn.Linear(6, 6)(torch.randn(4, 6))
    second(other)  # a different tensor is accumulated separately
    grams = collector.close()
    flat = torch.cat([batch.reshape(-1, 6) for batch in batches]).double()
    assert torch.allclose(grams["first"], flat.T @ flat)
    assert torch.allclose(grams["second"], flat.T @ flat + other.detach().double().T @ other.detach().double())
    assert collector.tokens["first"] == 20 and collector.tokens["second"] == 24
    first(torch.randn(1, 6))  # hooks are gone after close()
    assert collector.tokens["first"] == 20
