"""``efedllm eval-ppl``: windowed perplexity of a model, optionally SVD-compressed."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from efedllm.cli.arguments import add_compression_arguments, add_dtype, add_model, compression_config_from_args
from efedllm.cli.parser import positive_int
from efedllm.compression.apply import CompressionConfig, CompressionReport
from efedllm.compression.calibration import compress_span
from efedllm.compression.perplexity import PerplexityResult, default_text_path, read_text, tokenize, windowed_perplexity
from efedllm.models.span import load_client_parts, load_span
from efedllm.models.weights import model_blocks


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval-ppl", help="windowed perplexity of a model, optionally SVD-compressed")
    add_model(parser)
    add_dtype(parser, quant=True)
    parser.add_argument("--text", type=Path, help="text file (default: ../shared/data/wikitext2-test.raw)")
    parser.add_argument("--tokens", type=positive_int, default=8192, help="evaluate the first N tokens (default 8192)")
    parser.add_argument("--window", type=positive_int, default=1024, help="window length in tokens (default 1024)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    add_compression_arguments(parser)
    parser.set_defaults(func=run_eval_ppl)


def run_eval_ppl(args: argparse.Namespace) -> int:
    text = args.text or default_text_path()
    if text is None or not Path(text).is_file():
        raise ValueError(f"no text {text or ''}: pass --text FILE (or provide ../shared/data/wikitext2-test.raw)")
    model_blocks(args.model)
    config = compression_config_from_args(args)
    if config is not None and args.quant is not None:
        raise ValueError("--quant and --svd-* cannot be combined yet: choose one")
    if config is not None and config.calibration_text is None:
        config = replace(config, calibration_text=text)
    result, report = evaluate_model(args.model, Path(text), config, args.tokens, args.window, args.dtype, args.quant)
    record = {"model": args.model, "text": str(text), "tokens": args.tokens, "window": args.window, "dtype": args.dtype,
              "quant": args.quant, **result.to_dict()}
    if report is not None:
        record["compression"] = {"method": config.method.value, "ratio": config.ratio, "energy": config.energy, **report.summary()}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"perplexity {result.perplexity:.3f} over {result.predicted_tokens} predicted tokens in {result.windows} windows of {text}")
        if report is not None:
            print("compression: " + ", ".join(f"{key} {value}" for key, value in record["compression"].items()))
    return 0


def evaluate_model(model: str, text: Path, config: CompressionConfig | None, tokens: int, window: int,
                   dtype: str = "float32", quant: str | None = None) -> tuple[PerplexityResult, CompressionReport | None]:
    """(PerplexityResult, CompressionReport or None) for the whole model, compressed as one span."""
    client = load_client_parts(model, dtype)
    body = load_span(model, 0, client.config.num_hidden_layers, dtype, quant)
    report = compress_span(body, model, config) if config is not None else None
    token_ids = tokenize(client.tokenizer, read_text(text))
    result = windowed_perplexity(lambda ids: client.logits(body(client.embed(ids))), token_ids, window, tokens)
    return result, report
