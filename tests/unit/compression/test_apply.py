import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from efedllm.compression.apply import CompressionConfig, compress_layers, projections, whitened_spectra
from efedllm.compression.calibration import calibration_windows, decoder_layer_runner
from efedllm.compression.lowrank import LowRankLinear
from efedllm.compression.rank import rank_for_ratio
from efedllm.compression.transfer import load_packed_layers, pack_layers, transfer_size, unpack_layers


def _tiny(seed: int = 0):
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, vocab_size=64
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    layers = nn.ModuleList([LlamaDecoderLayer(config, index) for index in range(3)]).eval()
    for parameter in layers.parameters():
        if parameter.dim() == 2:  # projections: random, so that truncation has something to lose
            nn.init.normal_(parameter, std=0.2)
    hidden = torch.randn(6, 16, 32) * torch.linspace(0.1, 3.0, 32)  # uneven channel scales
    return config, layers, hidden


def projections_of(layer):
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [getattr(layer.self_attn if name[0] in "qkvo" else layer.mlp, name) for name in names]


def _run_all(config, layers, hidden):
    run = decoder_layer_runner(config, layers)
    with torch.no_grad():
        for index in range(len(layers)):
            hidden = run(index, hidden)
    return hidden


def test_plain_uniform_uses_eq15_ranks_everywhere():
    config, layers, hidden = _tiny()
    report = compress_layers(layers, CompressionConfig(ratio=0.5, method="plain", allocation="uniform", factor_form="svd"))
    assert len(report.matrices) == 3 * 7
    for matrix in report.matrices:
        assert matrix.rank == rank_for_ratio(*matrix.shape, 0.5)
        assert 0 < matrix.retained_energy <= 1
    assert all(isinstance(module, LowRankLinear) for layer in layers for module in projections_of(layer))
    assert report.achieved_ratio <= 0.5
    assert torch.isfinite(_run_all(config, layers, hidden)).all()


def test_whitened_global_allocation_fits_the_budget_and_beats_plain():
    config, reference_layers, hidden = _tiny()
    reference = _run_all(config, reference_layers, hidden)
    errors = {}
    for method, allocation in (("plain", "uniform"), ("whitened", "uniform"), ("whitened", "global")):
        _, layers, _ = _tiny()
        run = decoder_layer_runner(config, layers)
        report = compress_layers(layers, CompressionConfig(ratio=0.6, method=method, allocation=allocation), hidden, run)
        assert report.achieved_ratio <= 0.6 + 1e-9
        errors[method, allocation] = float((_run_all(config, layers, hidden) - reference).norm() / reference.norm())
    assert errors["whitened", "uniform"] < errors["plain", "uniform"]
    assert errors["whitened", "global"] < errors["plain", "uniform"]


def test_precomputed_spectra_give_the_same_result():
    config, layers, hidden = _tiny()
    spectra = whitened_spectra(layers, hidden, decoder_layer_runner(config, layers))
    assert len(spectra) == 21
    first = compress_layers(layers, CompressionConfig(ratio=0.7, allocation="global"), hidden, decoder_layer_runner(config, layers), spectra)
    _, again, _ = _tiny()
    second = compress_layers(again, CompressionConfig(ratio=0.7, allocation="global"), hidden, decoder_layer_runner(config, again))
    assert [m.rank for m in first.matrices] == [m.rank for m in second.matrices]


def test_energy_rule_keeps_at_least_the_energy():
    _, layers, _ = _tiny()
    report = compress_layers(layers, CompressionConfig(energy=0.8, method="plain"))
    assert all(matrix.retained_energy >= 0.8 for matrix in report.matrices)


def test_compressed_decoder_layers_survive_transfer():
    config, layers, hidden = _tiny()
    compress_layers(layers, CompressionConfig(ratio=0.6, allocation="global"), hidden, decoder_layer_runner(config, layers))
    _, receiver, _ = _tiny(seed=5)
    load_packed_layers(receiver, unpack_layers(pack_layers(layers, 0)))
    assert torch.equal(_run_all(config, layers, hidden), _run_all(config, receiver, hidden))
    size = transfer_size(layers)
    stored = sum(tensor.numel() * tensor.element_size() for layer in layers for tensor in layer.state_dict().values())
    assert stored < size.payload_bytes < stored + 100 * 48  # what is stored, plus msgpack headers (~100 bytes per tensor)
    assert size.ratio < 0.7  # C = 0.6 of the parameters, plus norms and row orders (1/8 of a tiny 32-wide layer)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one"),
        ({"ratio": 0.5, "energy": 0.9}, "exactly one"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": 0.5, "method": "magic"}, "method"),
        ({"ratio": 0.5, "calibration_samples": 0}, "calibration_samples"),
    ],
)
def test_bad_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**kwargs)


def test_whitened_needs_calibration_and_sane_inputs():
    config, layers, hidden = _tiny()
    with pytest.raises(ValueError, match="calibration"):
        compress_layers(layers, CompressionConfig(ratio=0.5))
    with pytest.raises(ValueError, match="NaN"):
        compress_layers(layers, CompressionConfig(ratio=0.5), hidden * float("nan"), decoder_layer_runner(config, layers))
    assert all(isinstance(module, nn.Linear) for module in projections(layers[0]).values())  # untouched on error


def test_calibration_windows_are_seeded_and_after_the_offset():
    ids = torch.arange(1000)
    windows = calibration_windows(ids, 4, 50, 600, seed=3)
    assert windows.shape == (4, 50) and int(windows.min()) >= 600
    assert torch.equal(windows, calibration_windows(ids, 4, 50, 600, seed=3))
    with pytest.raises(ValueError, match="tokens"):
        calibration_windows(ids, 1, 500, 600, seed=0)


def test_default_allocation_is_loss_for_whitened_ratios():
    assert CompressionConfig(ratio=0.8).allocation.value == "loss"
    assert CompressionConfig(ratio=0.8, method="plain").allocation.value == "global"
    assert CompressionConfig(energy=0.9).allocation.value == "uniform"
    assert CompressionConfig(ratio=0.8).factor_form.value == "interpolative"
    assert CompressionConfig(ratio=0.8).signature()["factor_form"] == "interpolative"


def test_interpolative_form_fits_the_budget_with_less_output_error_than_eq9_form():
    errors = {}
    for form in ("svd", "interpolative"):
        config, layers, hidden = _tiny()
        reference = _run_all(config, layers, hidden)
        report = compress_layers(layers, CompressionConfig(ratio=0.6, allocation="global", factor_form=form), hidden,
                                 decoder_layer_runner(config, layers))
        assert report.achieved_ratio <= 0.6 + 1e-9
        errors[form] = float((_run_all(config, layers, hidden) - reference).norm() / reference.norm())
    assert errors["interpolative"] < 0.95 * errors["svd"]
