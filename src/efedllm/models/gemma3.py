"""The Gemma 3 text family (``gemma3_text``): transformers' own Gemma 3 modules.

What differs from Llama, all of it in transformers' modules or in this record: four norms per
block and q/k norms, all of the (1 + w) kind; ``query_pre_attn_scalar``; sliding-window and
global layers in a pattern, with a rotary base each (the rotary module takes the layer type);
embeddings scaled by sqrt(hidden); a tied head. llama.cpp stores every norm weight as 1 + w, so
reading GGUF subtracts the 1 again (as transformers' GGUF loader does).
"""

from __future__ import annotations

import numpy as np
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer, Gemma3RMSNorm, Gemma3RotaryEmbedding

from efedllm.models.family import ModelFamily, sqrt_hidden_scale
from efedllm.models.llama import LLAMA_LAYER_TENSORS

GEMMA3_LAYER_TENSORS = {
    **{gguf: hf for gguf, hf in LLAMA_LAYER_TENSORS.items() if gguf != "ffn_norm.weight"},
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}


def gemma_rotary(rotary, hidden, position_ids, layer_type: str):
    return rotary(hidden, position_ids, layer_type)  # (cos, sin) of this layer type's rotary base


def fix_gemma_gguf_tensor(array: np.ndarray, gguf_name: str, config) -> np.ndarray:
    return array - 1 if gguf_name.endswith("norm.weight") else array


def gemma_to_gguf_tensor(array: np.ndarray, gguf_name: str, config) -> np.ndarray:
    return array + 1 if gguf_name.endswith("norm.weight") else array


def gemma3_family() -> ModelFamily:
    return ModelFamily(
        model_type="gemma3_text",
        config_class=Gemma3TextConfig,
        decoder_layer_class=Gemma3DecoderLayer,
        rotary_class=Gemma3RotaryEmbedding,
        norm_class=Gemma3RMSNorm,
        layer_tensors=GEMMA3_LAYER_TENSORS,
        gguf_architectures=("gemma3",),
        position_embeddings=gemma_rotary,
        embedding_scale=sqrt_hidden_scale,
        fix_gguf_tensor=fix_gemma_gguf_tensor,
        to_gguf_tensor=gemma_to_gguf_tensor,
    )
