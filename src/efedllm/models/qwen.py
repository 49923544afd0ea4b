"""The Qwen2 (q/k/v biases) and Qwen3 (q/k norms) families: transformers' own Qwen modules.

llama.cpp's converters keep Qwen's q/k rows as they are (its rotary is the half-split kind that
transformers uses), so no GGUF tensor needs fixing.
"""

from __future__ import annotations

from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

from efedllm.models.family import ModelFamily
from efedllm.models.llama import LLAMA_LAYER_TENSORS

QWEN2_LAYER_TENSORS = {
    **LLAMA_LAYER_TENSORS,
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
QWEN3_LAYER_TENSORS = {
    **LLAMA_LAYER_TENSORS,
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}


def qwen2_family() -> ModelFamily:
    return ModelFamily(
        model_type="qwen2",
        config_class=Qwen2Config,
        decoder_layer_class=Qwen2DecoderLayer,
        rotary_class=Qwen2RotaryEmbedding,
        norm_class=Qwen2RMSNorm,
        layer_tensors=QWEN2_LAYER_TENSORS,
        gguf_architectures=("qwen2",),
    )


def qwen3_family() -> ModelFamily:
    return ModelFamily(
        model_type="qwen3",
        config_class=Qwen3Config,
        decoder_layer_class=Qwen3DecoderLayer,
        rotary_class=Qwen3RotaryEmbedding,
        norm_class=Qwen3RMSNorm,
        layer_tensors=QWEN3_LAYER_TENSORS,
        gguf_architectures=("qwen3",),
    )
