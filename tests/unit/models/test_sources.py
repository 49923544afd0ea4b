"""A model can also be a GGUF path or a local Hugging Face directory (config.json + safetensors)."""

from __future__ import annotations

import copy

import torch
from safetensors.torch import save_file

from efedllm.models.sources import SourceKind, resolve_model
from efedllm.models.span import load_client_parts, load_span
from tests.conftest import gguf_path


def test_gguf_path_and_hf_directory_give_the_same_model(tmp_path, reference_model, client_parts, full_span):
    assert resolve_model(str(gguf_path())).kind is SourceKind.GGUF
    config = copy.deepcopy(reference_model.config)
    del config.quantization_config  # weights are plain float32 here
    config.save_pretrained(tmp_path)
    state = {name: tensor.clone().contiguous() for name, tensor in reference_model.state_dict().items()
             if name != "lm_head.weight"}  # tied to the embeddings
    save_file(state, str(tmp_path / "model.safetensors"))
    client_parts.tokenizer.save_pretrained(tmp_path)
    assert resolve_model(str(tmp_path)).kind is SourceKind.HF_DIRECTORY
    span = load_span(str(tmp_path), 12, 15)
    parts = load_client_parts(str(tmp_path))
    hidden = torch.randn(1, 5, 576)
    with torch.inference_mode():
        expected = full_span(hidden, blocks=span.span)
        assert torch.allclose(span(hidden), expected, atol=1e-5)
        ids = torch.tensor([[1, 200, 300]])
        assert torch.allclose(parts.logits(parts.embed(ids)), client_parts.logits(client_parts.embed(ids)), atol=1e-5)
    assert parts.tokenizer("hello")["input_ids"] == client_parts.tokenizer("hello")["input_ids"]
