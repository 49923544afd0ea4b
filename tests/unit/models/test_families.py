"""Every family against transformers itself: tiny random models, from HF directories and from GGUF files.

Each family's tiny model (``efedllm.models.synthetic``) has 8 layers, sliding windows of 8 tokens
where the family has them (Gemma 3's pattern of 6 crosses a global layer) and prompts of 20 tokens,
longer than the window. The reference for a GGUF file is transformers loading that same file.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers import AutoModelForCausalLM

from efedllm.client.local import LocalModelForCausalLM
from efedllm.client.sampling import GenerationConfig
from efedllm.common.spans import parse_spans
from efedllm.compression.apply import CompressionConfig
from efedllm.compression.calibration import compress_span
from efedllm.models.adapters import AdapterSpec
from efedllm.models.families import FAMILIES, family_for
from efedllm.models.span import load_span
from efedllm.models.synthetic import TINY_VOCAB, tiny_config, write_checkpoint, write_gguf

SPLITS = {"1 span": None, "3 spans": parse_spans("0:3,3:6,6:8")}
SOURCES = ("hf", "gguf")
GREEDY = GenerationConfig(max_new_tokens=12, greedy=True, stop_on_eos=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """model type -> {"hf": directory, "gguf": file}, each written once."""
    built = {}
    for model_type in FAMILIES:
        folder = tmp_path_factory.mktemp(model_type)
        directory = write_checkpoint(tiny_config(model_type), folder / "hf")
        built[model_type] = {"hf": directory, "gguf": write_gguf(directory, folder / "model.gguf")}
    return built


def _reference(path):
    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _prompt() -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))  # [1, 20]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_logits_and_greedy_tokens_match_transformers(checkpoints, model_type, source):
    path = checkpoints[model_type][source]
    # transformers cannot read a Mixtral GGUF file (llama.cpp's "llama" with experts): its reference is the HF directory
    reference_path = checkpoints[model_type]["hf"] if model_type == "mixtral" else path
    reference, input_ids = _reference(reference_path), _prompt()
    with torch.no_grad():
        expected_logits = reference(input_ids).logits
        expected_tokens = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                             max_new_tokens=GREEDY.max_new_tokens, eos_token_id=None,
                                             pad_token_id=0)[0, input_ids.shape[1]:].tolist()
    for split, spans in SPLITS.items():
        model = LocalModelForCausalLM.load(str(path), spans)
        with model.inference_session(max_length=input_ids.shape[1]) as session:
            logits = model.parts.logits(session.step(model.parts.embed(input_ids)))
        assert (logits - expected_logits).abs().max().item() < 1e-4, (model_type, source, split)
        assert model.generate(input_ids, GREEDY).token_ids == expected_tokens, (model_type, source, split)


def test_a_gemma3_span_keeps_each_blocks_global_attention_kind(checkpoints):
    model = LocalModelForCausalLM.load(str(checkpoints["gemma3_text"]["hf"]), parse_spans("0:3,3:6,6:8"))
    kinds = [kind for span in model.spans for kind in span.layer_types]
    assert kinds == tiny_config("gemma3_text").layer_types  # block 5 is the global one, in the second span
    assert "full_attention" in model.spans[1].layer_types and "full_attention" not in model.spans[0].layer_types


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_whitened_svd_compression_with_calibration_runs_on_every_family(checkpoints, model_type):
    path = str(checkpoints[model_type]["hf"])
    config = CompressionConfig(ratio=0.9, calibration_samples=2, calibration_length=32)
    reports = []
    compressed = LocalModelForCausalLM.load(path, parse_spans("0:3,3:6,6:8"),
                                            transform=lambda span: reports.append(compress_span(span, path, config)))
    dense, input_ids = LocalModelForCausalLM.load(path), _prompt()
    logits = {}
    for name, model in (("dense", dense), ("compressed", compressed)):
        with model.inference_session(max_length=input_ids.shape[1]) as session:
            logits[name] = model.parts.logits(session.step(model.parts.embed(input_ids)))
    assert all(report.achieved_ratio <= 0.9 + 1e-3 for report in reports), [r.achieved_ratio for r in reports]
    per_block = sum(len(stage) for stage in family_for(model_type).projection_stages)  # Mixtral: attention only
    assert sum(len(report.matrices) for report in reports) == 8 * per_block
    # random weights have flat spectra, so C = 0.9 (about half of each rank) costs much: the compressed model's
    # logits must still follow the dense model's
    similarity = torch.nn.functional.cosine_similarity(logits["compressed"].flatten(), logits["dense"].flatten(), dim=0)
    assert torch.isfinite(logits["compressed"]).all() and 0.3 < similarity < 1 - 1e-6, similarity


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_fine_tunes_through_spans_as_transformers_with_peft(checkpoints, model_type):
    """LoRA through 3 spans: the loss and every adapter gradient of transformers with peft's LoRA holding the
    same tensors; deep prompt tuning through 3 spans: those of 1 span."""
    path = checkpoints[model_type]["hf"]
    input_ids = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    split = LocalModelForCausalLM.load(str(path), SPLITS["3 spans"])
    spec = AdapterSpec("lora", rank=2, alpha=4.0)
    model = split.trainable(spec, seed=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # B = 0 would leave A's gradients zero
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    reference = _reference(path)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4.0, target_modules=list(spec.targets), lora_dropout=0.0), reference)
    reference.requires_grad_(False)
    parameters = dict(reference.named_parameters())
    for name, tensor in model.adapter_tensors().items():
        _, block, rest = name.split(".", 2)
        parameters[f"model.layers.{block}.{rest}.default.weight"].data.copy_(tensor)
        parameters[f"model.layers.{block}.{rest}.default.weight"].requires_grad_(True)
    expected = reference(input_ids=input_ids, labels=input_ids).loss
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-4 * abs(expected.item()), model_type
    for name, parameter in model.named_parameters():
        _, block, rest = name.removeprefix("adapters.").replace("__", ".").split(".", 2)
        grad = parameters[f"model.layers.{block}.{rest}.default.weight"].grad
        assert float((parameter.grad - grad).norm() / grad.norm()) <= 1e-4, (model_type, name)

    deep = AdapterSpec("deep-ptune", prompts=2)
    whole = LocalModelForCausalLM(split.parts, [load_span(str(path), 0, 8)]).trainable(deep, seed=0)
    results = []
    for trainable in (split.trainable(deep, seed=0), whole):
        trainable(input_ids, labels=input_ids).loss.backward()
        results.append({name: parameter.grad for name, parameter in trainable.named_parameters()})
    assert all(float((results[0][name] - grad).norm() / grad.norm()) <= 1e-4 for name, grad in results[1].items())
