"""A model family: what differs between architectures, in one small record.

A family names the transformers classes to reuse (config, decoder layer, rotary embedding,
norm) and how tensors are named in GGUF files and in Hugging Face checkpoints. Families are
registered in :mod:`efedllm.models.families`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


def _identity(array: np.ndarray, gguf_name: str, config) -> np.ndarray:
    return array


@dataclass(frozen=True)
class ModelFamily:
    """How to build and fill one architecture from transformers' own modules.

    ``layer_tensors`` maps a GGUF per-block tensor suffix (``attn_q.weight``) to the parameter name
    inside one decoder layer (``self_attn.q_proj.weight``); HF checkpoints use
    ``{hf_layer_prefix}{i}.{parameter}``. ``fix_gguf_tensor`` undoes conversions llama.cpp applied.
    """

    model_type: str
    config_class: type
    decoder_layer_class: type
    rotary_class: type
    norm_class: type
    layer_tensors: dict[str, str]
    hf_layer_prefix: str = "model.layers."
    hf_embedding: str = "model.embed_tokens.weight"
    hf_final_norm: str = "model.norm.weight"
    hf_lm_head: str = "lm_head.weight"
    gguf_embedding: str = "token_embd.weight"
    gguf_final_norm: str = "output_norm.weight"
    gguf_lm_head: str = "output.weight"
    fix_gguf_tensor: Callable[[np.ndarray, str, object], np.ndarray] = field(default=_identity)
