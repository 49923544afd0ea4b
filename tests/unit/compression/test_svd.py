import pytest
import torch

from efedllm.compression.lowrank import LowRankLinear
from efedllm.compression.svd import exact_svd, randomized_svd, truncated_svd


def _decaying_matrix(m: int, n: int, decay: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=generator, dtype=torch.float64))
    values = decay ** torch.arange(min(m, n), dtype=torch.float64)
    return (U * values) @ V.T


def test_exact_truncation_error_is_the_dropped_singular_values():
    matrix = _decaying_matrix(60, 40, 0.9)
    factors = exact_svd(matrix, 10)
    all_values = torch.linalg.svdvals(matrix)
    error = torch.linalg.matrix_norm(matrix - factors.reconstruct())
    assert error == pytest.approx(float(all_values[10:].norm()), rel=1e-9)
    assert factors.parameter_count == 10 * (60 + 40 + 1)


@pytest.mark.parametrize("decay", [0.97, 0.9])
def test_randomized_error_is_close_to_exact(decay):
    matrix = _decaying_matrix(300, 200, decay, seed=1).float()
    generator = torch.Generator().manual_seed(0)
    exact = torch.linalg.matrix_norm(matrix - exact_svd(matrix, 40).reconstruct())
    fast = torch.linalg.matrix_norm(matrix - randomized_svd(matrix, 40, 10, 2, generator).reconstruct())
    assert exact <= fast <= 1.05 * exact
    # power iterations matter on a slowly decaying spectrum
    rough = torch.linalg.matrix_norm(matrix - randomized_svd(matrix, 40, 0, 0, torch.Generator().manual_seed(0)).reconstruct())
    assert fast <= rough


def test_randomized_recovers_an_exactly_low_rank_matrix():
    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(120, 8, generator=generator, dtype=torch.float64) @ torch.randn(8, 90, generator=generator, dtype=torch.float64)
    factors = truncated_svd(matrix, 8, "randomized", generator=generator)
    assert torch.allclose(factors.reconstruct(), matrix, atol=1e-9)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="rank"):
        exact_svd(torch.ones(4, 3), 4)
    with pytest.raises(ValueError, match="NaN"):
        exact_svd(torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="2-D"):
        exact_svd(torch.ones(3), 1)
    with pytest.raises(ValueError):
        truncated_svd(torch.ones(4, 4), 1, "quantum")


def test_low_rank_layer_equals_its_dense_reconstruction():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 32, bias=True)
    layer = LowRankLinear.from_linear(linear, 12)
    inputs = torch.randn(5, 7, 48)
    reference = torch.nn.functional.linear(inputs, layer.dense_weight(), linear.bias)
    assert torch.allclose(layer(inputs), reference, atol=1e-5)
    assert layer.parameter_count == 12 * (32 + 48 + 1) + 32
    assert layer.nbytes == layer.parameter_count * 4
    # full rank reproduces the dense layer
    full = LowRankLinear.from_linear(linear, 32)
    assert torch.allclose(full(inputs), linear(inputs), atol=1e-5)
