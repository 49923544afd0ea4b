"""Weight-only int8: quantisation itself, the int8 modules, and spans loaded int8 for every family."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from efedllm.client.local import LocalModelForCausalLM
from efedllm.compression.apply import CompressionConfig
from efedllm.models.families import FAMILIES
from efedllm.models.quantization import (
    Int8Experts,
    Int8Linear,
    is_quantized,
    parse_quantization,
    quantize_module,
    quantize_rows,
    weight_format,
)
from efedllm.models.span import load_span
from efedllm.models.synthetic import TINY_VOCAB, tiny_config, write_checkpoint
from efedllm.common.errors import RecordError
from efedllm.common.spans import Span
from efedllm.server.config import ServerConfig
from efedllm.server.weights import pack_span_weights


def test_quantised_rows_are_within_half_a_step_of_the_weights():
    weight = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    weight[3] = 0.0  # an all-zero row must not divide by zero
    q, scales = quantize_rows(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (48,)
    assert int(q.abs().max()) <= 127 and bool((q[3] == 0).all())
    error = (q.float() * scales.float().unsqueeze(-1) - weight).abs()
    assert bool((error <= scales.float().unsqueeze(-1) / 2 + 1e-6).all())


def test_quantised_rows_of_a_3d_tensor_are_per_row_of_each_matrix():
    weight = torch.randn(3, 16, 32)
    q, scales = quantize_rows(weight)
    assert q.shape == (3, 16, 32) and scales.shape == (3, 16)
    assert torch.equal(quantize_rows(weight[1])[0], q[1])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_the_dense_layer_and_keeps_the_input_dtype(bias, dtype):
    dense = nn.Linear(64, 96, bias=bias)
    quantised = quantize_module(nn.Sequential(dense), "int8")[0]
    assert isinstance(quantised, Int8Linear)
    inputs = torch.randn(2, 5, 64)
    expected, got = dense(inputs), quantised(inputs.to(dtype))
    assert got.dtype == dtype and got.shape == (2, 5, 96)
    relative = (got.float() - expected).norm() / expected.norm()
    assert relative < 0.02, relative


def test_int8_linear_refuses_a_weight_of_the_wrong_shape():
    layer = Int8Linear(8, 4, bias=False)
    with pytest.raises(RuntimeError, match="shape"):
        layer.load_state_dict({"weight": torch.zeros(8, 8)}, strict=False)


def test_an_int8_state_dict_round_trips():
    layer = quantize_module(nn.Sequential(nn.Linear(16, 8)), "int8")[0]
    copy = Int8Linear(16, 8, bias=True)
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(copy.weight_int8, layer.weight_int8) and torch.equal(copy.scales, layer.scales)


def test_bad_quantisation_names_the_choices():
    with pytest.raises(ValueError, match=r"int4.*\['int8'\]"):
        parse_quantization("int4")
    assert weight_format("bfloat16", "int8") == "bfloat16+int8" and weight_format("float32", None) == "float32"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {model_type: write_checkpoint(tiny_config(model_type), tmp_path_factory.mktemp(model_type) / "hf")
            for model_type in FAMILIES}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_loads_int8_with_a_quarter_of_the_bytes_and_close_logits(checkpoints, model_type):
    path = str(checkpoints[model_type])
    dense, quantised = load_span(path, 0, 8), load_span(path, 0, 8, quant="int8")
    assert is_quantized(quantised) and not is_quantized(dense)
    linear_like = [m for m in quantised.modules() if isinstance(m, (nn.Linear, Int8Linear, Int8Experts))]
    assert linear_like and not any(type(m) is nn.Linear for m in linear_like)  # every projection is int8
    if model_type == "mixtral":
        assert any(isinstance(m, Int8Experts) for m in quantised.modules())
    sizes = [sum(t.numel() * t.element_size() for t in model.state_dict().values()) for model in (dense, quantised)]
    assert sizes[1] <= 0.3 * sizes[0], sizes
    local = LocalModelForCausalLM.load(path), LocalModelForCausalLM.load(path, quant="int8")
    ids = torch.randint(0, TINY_VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = (model.parts.logits(model.spans[0](model.parts.embed(ids))) for model in local)
    cosine = torch.nn.functional.cosine_similarity(expected, got, dim=-1)
    assert float(cosine.min()) > 0.99, cosine.min()


@pytest.mark.parametrize("model_type", ["qwen2", "mixtral"])  # mixtral: experts quantised one stored part at a time
def test_quantising_after_loading_gives_the_same_weights_as_quantising_on_load(checkpoints, model_type):
    path = str(checkpoints[model_type])
    on_load, after = load_span(path, 2, 4, quant="int8"), load_span(path, 2, 4)
    for layer in after.layers:
        quantize_module(layer, "int8")
    for (name, tensor), (other, twin) in zip(on_load.state_dict().items(), after.state_dict().items()):
        assert name == other and torch.equal(tensor, twin), name


def test_an_int8_span_is_not_handed_on_as_weights(checkpoints):
    span = load_span(str(checkpoints["llama"]), 0, 2, quant="int8")
    with pytest.raises(RecordError, match="int8"):
        pack_span_weights(span, Span(0, 2), None)


def test_server_config_announces_int8_and_refuses_it_with_svd():
    config = ServerConfig(blocks=Span(0, 10), dtype="bfloat16", quant="int8")
    assert config.weight_format == "bfloat16+int8"
    with pytest.raises(ValueError, match="quant"):
        ServerConfig(blocks=Span(0, 10), quant="int8", compression=CompressionConfig(ratio=0.8))
    with pytest.raises(ValueError, match="int4"):
        ServerConfig(blocks=Span(0, 10), quant="int4")


def test_a_stored_part_that_does_not_fit_its_composite_is_refused(checkpoints):
    from efedllm.models.family import CompositeTensor
    from efedllm.models.span import fill_composite_part
    from efedllm.models.weights import StoredPart

    span = load_span(str(checkpoints["mixtral"]), 0, 1, quant="int8")
    experts = span.layers[0].mlp.experts
    composite = CompositeTensor(tuple(experts.gate_up_proj_int8.shape), ())
    wrong = StoredPart(torch.zeros(3, 5), composite, (0, slice(0, 3)))
    with pytest.raises(ValueError, match="does not fit"):
        fill_composite_part(span.layers[0], "mlp.experts.gate_up_proj", wrong, torch.float32)
