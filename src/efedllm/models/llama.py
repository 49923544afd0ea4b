"""The Llama family (Llama 2/3, SmolLM, TinyLlama, ...): transformers' own Llama modules."""

from __future__ import annotations

import numpy as np
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from efedllm.models.family import ModelFamily

LLAMA_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def unpermute_rotary_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of the rotary halves in q/k projection rows.

    llama.cpp's converter reorders each head's rows from (half, pair) to (pair, half) order;
    this swaps them back, exactly as transformers' GGUF loader does.
    """
    # array: [heads * head_dim, hidden]
    head_half = array.shape[0] // heads // 2
    rows = array.reshape(heads, head_half, 2, *array.shape[1:])
    return rows.swapaxes(2, 1).reshape(array.shape)


def permute_rotary_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaving of the rotary halves (the inverse of :func:`unpermute_rotary_rows`)."""
    # array: [heads * head_dim, hidden]
    head_half = array.shape[0] // heads // 2
    rows = array.reshape(heads, 2, head_half, *array.shape[1:])
    return rows.swapaxes(1, 2).reshape(array.shape)


def llama_to_gguf_tensor(array: np.ndarray, gguf_name: str, config: LlamaConfig) -> np.ndarray:
    if gguf_name.endswith("attn_q.weight"):
        return permute_rotary_rows(array, config.num_attention_heads)
    if gguf_name.endswith("attn_k.weight"):
        return permute_rotary_rows(array, config.num_key_value_heads)
    return array


def fix_llama_gguf_tensor(array: np.ndarray, gguf_name: str, config: LlamaConfig) -> np.ndarray:
    if gguf_name.endswith("attn_q.weight"):
        return unpermute_rotary_rows(array, config.num_attention_heads)
    if gguf_name.endswith("attn_k.weight"):
        return unpermute_rotary_rows(array, config.num_key_value_heads)
    return array


def llama_family() -> ModelFamily:
    return ModelFamily(
        model_type="llama",
        config_class=LlamaConfig,
        decoder_layer_class=LlamaDecoderLayer,
        rotary_class=LlamaRotaryEmbedding,
        norm_class=LlamaRMSNorm,
        layer_tensors=LLAMA_LAYER_TENSORS,
        gguf_architectures=("llama",),
        fix_gguf_tensor=fix_llama_gguf_tensor,
        to_gguf_tensor=llama_to_gguf_tensor,
    )
