import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from efedllm.compression.apply import CompressionConfig, compress_layers, projections
from efedllm.compression.calibration import decoder_layer_runner
from efedllm.compression.sensitivity import output_sensitivities


def _tiny():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, vocab_size=64)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layers = nn.ModuleList([LlamaDecoderLayer(config, index) for index in range(3)]).eval()
    for parameter in layers.parameters():
        if parameter.dim() == 2:
            nn.init.normal_(parameter, std=0.2)
    return config, layers, torch.randn(6, 16, 32) * torch.linspace(0.1, 3.0, 32)


def _run_all(config, layers, hidden):
    run = decoder_layer_runner(config, layers)
    with torch.no_grad():
        for index in range(len(layers)):
            hidden = run(index, hidden)
    return hidden


def test_sensitivities_are_the_mean_squared_output_gradients():
    torch.manual_seed(0)
    first, second = nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False)
    windows = torch.randint(0, 7, (6, 3))
    table = torch.randn(7, 5)

    def loss(batch):  # ‖W2·W1·x‖² summed over tokens
        return (second(first(table[batch])) ** 2).sum()

    values = output_sensitivities(loss, [first, second], windows, batch_size=4)
    x = table[windows].reshape(-1, 5).detach()
    y1 = x @ first.weight.T.detach()
    y2 = y1 @ second.weight.T.detach()
    grad2 = 2 * y2  # ∂L/∂y2
    grad1 = grad2 @ second.weight.detach()  # ∂L/∂y1
    assert values[0] == pytest.approx(float((grad1**2).sum()) / (18 * 4), rel=1e-5)
    assert values[1] == pytest.approx(float((grad2**2).sum()) / (18 * 3), rel=1e-5)
    with pytest.raises(ValueError, match="token windows"):
        output_sensitivities(loss, [first], torch.zeros(0, 3, dtype=torch.long))


def test_loss_allocation_spends_rank_where_the_loss_is_sensitive():
    config, layers, hidden = _tiny()
    sensitive = [1.0 if index // 7 == 0 else 1e-6 for index in range(21)]  # only the first layer matters
    report = compress_layers(layers, CompressionConfig(ratio=0.6, allocation="loss"), hidden, decoder_layer_runner(config, layers), sensitivities=sensitive)
    assert report.achieved_ratio <= 0.6 + 1e-9
    first = [m.parameters / (m.shape[0] * m.shape[1]) for m in report.matrices if m.layer == 0]
    later = [m.parameters / (m.shape[0] * m.shape[1]) for m in report.matrices if m.layer > 0]
    assert min(first) > max(later)


def test_loss_allocation_needs_sensitivities_and_the_whitened_method():
    config, layers, hidden = _tiny()
    with pytest.raises(ValueError, match="sensitivities"):
        compress_layers(layers, CompressionConfig(ratio=0.6, allocation="loss"), hidden, decoder_layer_runner(config, layers))
    with pytest.raises(ValueError, match="sensitivities"):
        compress_layers(layers, CompressionConfig(ratio=0.6, allocation="loss"), hidden, decoder_layer_runner(config, layers), sensitivities=[1.0])
    assert all(isinstance(module, nn.Linear) for module in projections(layers[0]).values())
    with pytest.raises(ValueError, match="whitened"):
        CompressionConfig(ratio=0.6, method="plain", allocation="loss")


def test_dense_output_fit_compresses_a_span_within_budget():
    config, reference_layers, hidden = _tiny()
    reference = _run_all(config, reference_layers, hidden)
    _, layers, _ = _tiny()
    report = compress_layers(layers, CompressionConfig(ratio=0.6, allocation="global", fit_dense_outputs=True), hidden, decoder_layer_runner(config, layers))
    assert report.achieved_ratio <= 0.6 + 1e-9
    assert float((_run_all(config, layers, hidden) - reference).norm() / reference.norm()) < 1.0


def test_the_loss_pass_is_refused_up_front_when_the_dense_model_does_not_fit():
    from efedllm.compression.calibration import check_fits_in_memory, dense_block_bytes

    check_fits_in_memory(10 * 2**30, 16 * 2**30)
    check_fits_in_memory(10 * 2**30, None)  # no /proc/meminfo: nothing to check against
    with pytest.raises(ValueError, match="--svd-allocation global"):
        check_fits_in_memory(32 * 2**30, 24 * 2**30)
    config, _, _ = _tiny()
    assert dense_block_bytes(config) == 4 * sum(p.numel() for p in LlamaDecoderLayer(config, 0).parameters())
