"""Calibration inputs for whitened compression: token windows from text, and a per-layer runner.

Calibration windows are drawn (seeded) from the text *after* ``offset`` tokens, so that with the
defaults (offset 65,536) they never overlap the perplexity evaluation windows taken from the
start of the file (the first 8,192 tokens).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from efedllm.common.spans import Span
from efedllm.compression.apply import (
    CompressionConfig,
    CompressionReport,
    LayerRunner,
    RankAllocation,
    compress_layers,
    projections,
)
from efedllm.compression.perplexity import default_text_path, read_text, tokenize
from efedllm.compression.sensitivity import language_model_loss, output_sensitivities
from efedllm.models.families import family_for
from efedllm.models.family import SLIDING
from efedllm.models.span import SpanModel, load_client_parts, load_span


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


def causal_mask(length: int, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """Additive mask [1, 1, T, T]: 0 where a query may attend (at or before it, and within ``window`` tokens
    when one is given), the dtype's minimum elsewhere."""
    query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = (key <= query) if window is None else (key <= query) & (query - key < window)
    return torch.zeros(length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def decoder_layer_runner(config, layers: nn.ModuleList, batch_size: int = 8) -> LayerRunner:
    """A :data:`LayerRunner` for transformers decoder layers of ``config``'s family, built for ``config``
    (layer ``i`` is block ``i``): positions 0..T-1, causal, sliding where the block slides.

    The mask is explicit so that the result does not depend on the attention implementation.
    """
    family = family_for(config.model_type)
    rotary, kinds = family.rotary_class(config=config), family.layer_types(config)

    def run(index: int, hidden: torch.Tensor) -> torch.Tensor:
        outputs = []
        length, kind = hidden.shape[1], kinds[index]
        positions = torch.arange(length)[None]
        mask = causal_mask(length, hidden.dtype, config.sliding_window if kind == SLIDING else None)
        for chunk in hidden.split(batch_size):  # chunk: [b, T, H]
            cos_sin = family.position_embeddings(rotary, chunk, positions, kind)
            output = layers[index](chunk, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
            outputs.append(output[0] if isinstance(output, tuple) else output)
        return torch.cat(outputs)

    return run


def span_layer_runner(span_model, batch_size: int = 8) -> LayerRunner:
    """A :data:`LayerRunner` over an ``efedllm.models.SpanModel``: block ``span.start + i``, in batches."""
    start = span_model.span.start

    def run(index: int, hidden: torch.Tensor) -> torch.Tensor:
        block = Span(start + index, start + index + 1)
        return torch.cat([span_model(chunk, blocks=block) for chunk in hidden.split(batch_size)])

    return run


def calibration_token_ids(tokenizer, config) -> torch.Tensor:
    """The calibration windows [samples, length] of ``config`` from its text (default: shared WikiText-2)."""
    path = config.calibration_text or default_text_path()
    if path is None:
        raise FileNotFoundError("no calibration text: pass one (--calibration-text FILE) or provide ../shared/data/wikitext2-test.raw")
    token_ids = tokenize(tokenizer, read_text(path))
    return calibration_windows(token_ids, config.calibration_samples, config.calibration_length, config.calibration_offset, config.seed)


def span_calibration_inputs(model: str, start: int, config) -> torch.Tensor:
    """Calibration hidden states [samples, length, H] at the input of block ``start``, made from text.

    A server has no other servers' weights, so it embeds the text and runs it through the
    *uncompressed* blocks ``0..start-1``, loaded for the purpose and dropped afterwards; inside its own
    span the inputs then come from its already-compressed layers.
    """
    client = load_client_parts(model)
    with torch.no_grad():
        hidden = client.embed(calibration_token_ids(client.tokenizer, config))  # [samples, length, H]
        if start > 0:
            prefix = load_span(model, 0, start)
            run = span_layer_runner(prefix)
            for index in range(start):
                hidden = run(index, hidden)
    return hidden


def compress_span(span_model: SpanModel, model: str, config: CompressionConfig) -> CompressionReport:
    """Compress a loaded ``SpanModel`` in place by ``config``; returns the CompressionReport.

    Deterministic for a given (model, span, config): a local pipeline that compresses the same
    spans with the same config gets the same weights as the servers hosting them.
    """
    if not config.needs_calibration:
        return compress_layers(span_model.layers, config, stages=span_model.family.projection_stages)
    sensitivities = span_sensitivities(model, span_model.span, config) if config.allocation is RankAllocation.LOSS else None
    hidden = span_calibration_inputs(model, span_model.span.start, config)
    return compress_layers(span_model.layers, config, hidden, span_layer_runner(span_model), sensitivities=sensitivities,
                           stages=span_model.family.projection_stages)


def sensitivity_token_ids(tokenizer, config) -> torch.Tensor:
    """The loss-sensitivity windows [sensitivity_samples, length]: like the calibration ones, drawn with ``seed + 1``."""
    return calibration_token_ids(tokenizer, replace(config, calibration_samples=config.sensitivity_samples, seed=config.seed + 1))


def span_sensitivities(model: str, span, config) -> list[float]:
    """Loss sensitivities of the projections of blocks ``span.start..span.end-1`` (layer, then stage order).

    The language-model loss needs the whole model: like :func:`span_calibration_inputs` for the
    prefix, a server loads the *dense* model for the purpose and drops it afterwards.
    """
    client = load_client_parts(model)
    blocks = client.config.num_hidden_layers
    check_fits_in_memory(dense_block_bytes(client.config) * blocks, available_memory_bytes())
    return projection_sensitivities(client, load_span(model, 0, blocks), span, config)


def dense_block_bytes(config) -> int:
    """float32 bytes of one decoder block of ``config`` (built on the meta device: nothing is allocated)."""
    family = family_for(config.model_type)
    with torch.device("meta"):
        layer = family.decoder_layer_class(family.span_config(config, 0, 1), 0)
    return 4 * sum(parameter.numel() for parameter in layer.parameters())


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo, or None where there is none."""
    try:
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits_in_memory(needed: int, available: int | None) -> None:
    """Refuse the loss-sensitivity pass up front when the dense model would not fit (pure, for tests)."""
    if available is not None and needed > 0.8 * available:
        raise ValueError(
            f"--svd-allocation loss measures loss sensitivities on the whole dense model ({needed / 2**30:.1f} GiB in float32), "
            f"more than this machine can hold ({available / 2**30:.1f} GiB available): pass --svd-allocation global")


def projection_sensitivities(client, body, span, config) -> list[float]:
    """Like :func:`span_sensitivities`, with the client parts and the dense whole-model ``body`` already loaded."""
    stages = body.family.projection_stages
    modules = [module for layer in body.layers[span.start : span.end] for module in projections(layer, stages).values()]
    windows = sensitivity_token_ids(client.tokenizer, config)
    return output_sensitivities(language_model_loss(client.embed, body, client.logits), modules, windows)
