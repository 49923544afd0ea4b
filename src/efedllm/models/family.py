"""A model family: everything architecture-specific, in one small record.

A family names the transformers classes to reuse (config, decoder layer, rotary embedding, norm)
and says how to use them: which attention each layer has (full or sliding window), the rotary
embeddings a layer type takes, what the client does around the blocks (embedding scale, final
norm, logit soft-capping, tied head), which projections SVD compression factors, and how tensors
are named in GGUF files and in Hugging Face checkpoints. Families register themselves in
:mod:`efedllm.models.families`.

Call order (what :mod:`efedllm.models.span` does with a family):

1. ``span_config(config, span)``: the config the span's layers are built with (local layer
   indices, ``layer_types`` cut to the span, so a layer's attention kind follows its *global* index);
2. ``decoder_layer_class(span_config, local_index)`` on the meta device, filled from
   ``layer_tensors`` (GGUF, through ``fix_gguf_tensor``) or ``hf_layer_prefix`` names;
3. ``rotary_class(config=config)`` once per span; per forward and per layer type in the run,
   ``position_embeddings(rotary, hidden, position_ids, layer_type)`` and a mask of that kind;
4. on the client: ``embedding_scale``, ``norm_class`` for the final norm, ``logit_softcap``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

FULL = "full_attention"
SLIDING = "sliding_attention"
ATTENTION_KINDS = (FULL, SLIDING)
LLAMA_PROJECTION_STAGES: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),  # read the same input: one calibration pass
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def _identity(array: np.ndarray, gguf_name: str, config) -> np.ndarray:
    return array


def config_layer_types(config) -> list[str]:
    """Each layer's attention kind: the config's ``layer_types`` when it has them, else full attention."""
    types = getattr(config, "layer_types", None)
    return list(types) if types else [FULL] * config.num_hidden_layers


def sliding_everywhere(config) -> list[str]:
    """Mistral and Mixtral: every layer slides when the config has a window, none when it has not."""
    kind = SLIDING if getattr(config, "sliding_window", None) else FULL
    return [kind] * config.num_hidden_layers


@dataclass(frozen=True)
class CompositeTensor:
    """A parameter no checkpoint stores as it is (Mixtral's fused experts): a ``shape`` tensor whose
    ``parts`` are stored tensors, each copied to its index (a tuple over the leading dimensions).

    A loader allocates the parameter once and fills it one stored tensor at a time, so it never holds
    more than the parameter plus one part."""

    shape: tuple[int, ...]
    parts: tuple[tuple[str, tuple], ...]  # (stored tensor's suffix in the block, index into the parameter)


def no_composites(config, gguf: bool) -> dict:
    return {}


def single_rotary(rotary, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str):
    return rotary(hidden, position_ids=position_ids)  # (cos, sin) [1, tokens, head_dim], the same for every layer


def no_scale(config) -> float:
    return 1.0


def config_softcap(config) -> float | None:
    return getattr(config, "final_logit_softcapping", None)


@dataclass(frozen=True)
class ModelFamily:
    """How to build and fill one architecture from transformers' own modules (call order: module docstring).

    ``layer_tensors`` maps a GGUF per-block tensor suffix (``attn_q.weight``) to the parameter name
    inside one decoder layer (``self_attn.q_proj.weight``); HF checkpoints use
    ``{hf_layer_prefix}{i}.{parameter}``. ``fix_gguf_tensor`` undoes conversions llama.cpp applied;
    ``to_gguf_tensor`` applies them (:mod:`efedllm.models.synthetic` writes GGUF files with it).
    ``composite_tensors(config, gguf)`` names parameters built from several stored tensors (Mixtral's
    fused experts) and ``to_gguf_composites`` writes them back the way llama.cpp stores them.
    ``gguf_architectures`` are the ``general.architecture`` values whose files this family reads.
    """

    model_type: str
    config_class: type
    decoder_layer_class: type
    rotary_class: type
    norm_class: type
    layer_tensors: dict[str, str]
    gguf_architectures: tuple[str, ...] = ()
    layer_types: Callable[[object], list[str]] = field(default=config_layer_types)
    position_embeddings: Callable = field(default=single_rotary)
    embedding_scale: Callable[[object], float] = field(default=no_scale)
    logit_softcap: Callable[[object], float | None] = field(default=config_softcap)
    projection_stages: tuple[tuple[str, ...], ...] = LLAMA_PROJECTION_STAGES
    hf_layer_prefix: str = "model.layers."
    hf_embedding: str = "model.embed_tokens.weight"
    hf_final_norm: str = "model.norm.weight"
    hf_lm_head: str = "lm_head.weight"
    gguf_embedding: str = "token_embd.weight"
    gguf_final_norm: str = "output_norm.weight"
    gguf_lm_head: str = "output.weight"
    fix_gguf_tensor: Callable[[np.ndarray, str, object], np.ndarray] = field(default=_identity)
    to_gguf_tensor: Callable[[np.ndarray, str, object], np.ndarray] = field(default=_identity)  # llama.cpp's conversion
    # parameter -> the block's stored tensors it is built from, and where each goes
    composite_tensors: Callable[[object, bool], dict[str, CompositeTensor]] = field(default=no_composites)
    # llama.cpp's tensors for the composite parameters of one block, from its HF tensors (name suffix -> array)
    to_gguf_composites: Callable[[object, dict], dict[str, np.ndarray]] = field(default=lambda config, tensors: {})

    def span_config(self, config, start: int, end: int):
        """A copy of ``config`` for blocks ``start..end-1`` built with local indices 0..end-start-1."""
        types = self.layer_types(config)
        unknown = sorted(set(types) - set(ATTENTION_KINDS))
        if unknown:
            raise ValueError(f"{self.model_type}: attention kinds {unknown} are not supported ({ATTENTION_KINDS})")
        span_config = copy.copy(config)
        span_config.num_hidden_layers = end - start
        span_config.layer_types = types[start:end]
        return span_config

    def cache_config(self, span_config):
        """The config a span's KV cache is built from: full layers everywhere, because a session can rewind
        (crop) its cache; a sliding layer's window is applied by its mask instead."""
        cache_config = copy.copy(span_config)
        cache_config.layer_types = [FULL] * span_config.num_hidden_layers
        cache_config.sliding_window = None
        return cache_config


def sqrt_hidden_scale(config) -> float:
    """Gemma's embedding scale (transformers rounds it to the embedding's dtype when it multiplies)."""
    return math.sqrt(config.hidden_size)
