"""The Mistral family: Llama's tensors with sliding-window attention in every layer.

llama.cpp writes Mistral checkpoints as ``llama`` GGUF files (permuted q/k rows, no window), so a
Mistral GGUF file is read by the Llama family, as transformers and llama.cpp read it.
"""

from __future__ import annotations

from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding

from efedllm.models.family import ModelFamily, sliding_everywhere
from efedllm.models.llama import LLAMA_LAYER_TENSORS, fix_llama_gguf_tensor, llama_to_gguf_tensor


def mistral_family() -> ModelFamily:
    return ModelFamily(
        model_type="mistral",
        config_class=MistralConfig,
        decoder_layer_class=MistralDecoderLayer,
        rotary_class=MistralRotaryEmbedding,
        norm_class=MistralRMSNorm,
        layer_tensors=LLAMA_LAYER_TENSORS,
        gguf_architectures=("mistral",),
        layer_types=sliding_everywhere,
        fix_gguf_tensor=fix_llama_gguf_tensor,
        to_gguf_tensor=llama_to_gguf_tensor,
    )
