"""The hook that servers and the local pipeline use to compress a span right after loading it."""

from __future__ import annotations

from typing import Callable


def span_compressor(model: str, config) -> Callable:
    """A function that compresses a loaded ``SpanModel`` in place by ``config`` (a CompressionConfig)."""
    from efedllm.compression.calibration import compress_span

    return lambda span_model: compress_span(span_model, model, config)
