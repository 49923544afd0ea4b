"""Calibration inputs for whitened compression: token windows from text, and a per-layer runner.

Calibration windows are drawn (seeded) from the text *after* ``offset`` tokens, so that with the
defaults (offset 65,536) they never overlap the perplexity evaluation windows taken from the
start of the file (the first 8,192 tokens).
"""

from __future__ import annotations

import torch
from torch import nn

from efedllm.compression.apply import LayerRunner


def calibration_windows(token_ids: torch.Tensor, samples: int, length: int, offset: int, seed: int) -> torch.Tensor:
    """``samples`` random windows [samples, length] of ``token_ids[offset:]`` (1-D), seeded."""
    if token_ids.dim() != 1:
        raise ValueError(f"token ids must be 1-D, got shape {tuple(token_ids.shape)}")
    available = token_ids.numel() - offset - length
    if available < 0:
        raise ValueError(
            f"calibration needs more than {offset + length} tokens of text (offset {offset} + window {length}), "
            f"the text has {token_ids.numel()}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, available + 1, (samples,), generator=generator) + offset
    return torch.stack([token_ids[start : start + length] for start in starts.tolist()])


def causal_mask(length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, T, T]: 0 on and below the diagonal, the dtype's minimum above it."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def decoder_layer_runner(config, layers: nn.ModuleList, batch_size: int = 8) -> LayerRunner:
    """A :data:`LayerRunner` for transformers decoder layers (Llama family): positions 0..T-1, causal.

    The mask is explicit so that the result does not depend on the attention implementation.
    """
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config)

    def run(index: int, hidden: torch.Tensor) -> torch.Tensor:
        outputs = []
        length = hidden.shape[1]
        positions = torch.arange(length)[None]
        mask = causal_mask(length, hidden.dtype)
        for chunk in hidden.split(batch_size):  # chunk: [b, T, H]
            cos_sin = rotary(chunk, positions)
            output = layers[index](chunk, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
            outputs.append(output[0] if isinstance(output, tuple) else output)
        return torch.cat(outputs)

    return run
