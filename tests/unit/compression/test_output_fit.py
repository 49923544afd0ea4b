import pytest
import torch

from efedllm.compression.output_fit import InputRecorder, fit_error, output_fit_svd, paired_grams
from efedllm.compression.svd import exact_svd
from efedllm.compression.whitening import whitened_svd, whitening_factor


def _paired_inputs(samples: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense-model inputs X_o with uneven channels, and drifted inputs X_c = X_o·(I + E) + noise."""
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(samples, n, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 5.0, n, dtype=torch.float64)
    drift = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=generator, dtype=torch.float64)
    return dense @ drift + 0.1 * torch.randn(samples, n, generator=generator, dtype=torch.float64), dense


@pytest.mark.parametrize("seed", range(10))
def test_output_fit_is_never_worse_than_whitened_or_plain_truncation(seed):
    generator = torch.Generator().manual_seed(200 + seed)
    m, n = int(torch.randint(6, 30, (1,), generator=generator)), int(torch.randint(6, 30, (1,), generator=generator))
    weight = torch.randn(m, n, generator=generator, dtype=torch.float64)
    compressed, dense = _paired_inputs(5 * n, n, seed)
    gram, cross = paired_grams(compressed, dense)
    factor = whitening_factor(gram)
    for rank in range(1, min(m, n) + 1, 2):
        fitted = fit_error(weight, output_fit_svd(weight, factor, cross, rank).reconstruct(), compressed, dense)
        whitened = fit_error(weight, whitened_svd(weight, factor, rank).reconstruct(), compressed, dense)
        plain = fit_error(weight, exact_svd(weight, rank).reconstruct(), compressed, dense)
        assert fitted <= min(whitened, plain) * (1 + 1e-9) + 1e-9


def test_output_fit_equals_whitened_truncation_when_inputs_did_not_drift():
    inputs, _ = _paired_inputs(80, 12, 3)
    weight = torch.randn(7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    gram, cross = paired_grams(inputs, inputs)
    factor = whitening_factor(gram)
    fitted = output_fit_svd(weight, factor, cross, 5).reconstruct()
    assert torch.allclose(fitted, whitened_svd(weight, factor, 5).reconstruct(), atol=1e-8)


def test_paired_grams_match_direct_products_and_reject_misaligned_inputs():
    compressed, dense = torch.randn(5000, 6), torch.randn(5000, 6)  # more than one chunk
    gram, cross = paired_grams(compressed, dense)
    assert torch.allclose(gram, compressed.double().T @ compressed.double(), rtol=1e-5, atol=1e-3)
    assert torch.allclose(cross, compressed.double().T @ dense.double(), rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="paired inputs"):
        paired_grams(compressed, dense[:-1])
    with pytest.raises(ValueError, match="needs"):
        output_fit_svd(torch.randn(3, 6), torch.eye(5), torch.eye(6), 2)


def test_input_recorder_shares_one_input_and_stops_after_close():
    first, second = torch.nn.Linear(6, 3), torch.nn.Linear(6, 2)
    recorder = InputRecorder({"first": first, "second": second})
    batches = [torch.randn(2, 5, 6) for _ in range(2)]
    for batch in batches:
        first(batch), second(batch)
    inputs = recorder.close()
    flat = torch.cat([batch.reshape(-1, 6) for batch in batches])
    assert torch.equal(inputs["first"], flat) and torch.equal(inputs["second"], flat)
    first(torch.randn(1, 6))
    assert recorder.close()["first"].shape == (20, 6)
