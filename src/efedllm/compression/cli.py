"""``efedllm eval-ppl``: windowed perplexity of a model, optionally SVD-compressed.

Also :func:`add_compression_arguments` / :func:`compression_config_from_args`, which ``serve`` and
``generate`` reuse for ``--svd-ratio C | --svd-energy E [--svd-method plain|whitened]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_compression_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SVD compression (paper §4.2)")
    choice = group.add_mutually_exclusive_group()
    choice.add_argument("--svd-ratio", type=float, metavar="C", help="compression ratio C in (0, 1] of the span's projections (eq. 10)")
    choice.add_argument("--svd-energy", type=float, metavar="E", help="keep each matrix's retained energy E in (0, 1] (eq. 12)")
    group.add_argument(
        "--svd-method", choices=("plain", "whitened"), default="whitened", help="plain SVD or activation-whitened SVD (default)"
    )
    group.add_argument(
        "--svd-allocation", choices=("global", "loss", "uniform"), default="global",
        help="with --svd-ratio: one parameter budget over the span, matrices weighed by relative output error (default) "
        "or by measured loss sensitivity (loss: best perplexity, one backward pass through the dense model), or eq. 15 per matrix",
    )
    group.add_argument("--svd-algorithm", choices=("exact", "randomized"), default="exact")
    group.add_argument("--calibration-text", type=Path, help="text for whitening calibration (default: ../shared/data/wikitext2-test.raw)")
    group.add_argument("--calibration-samples", type=int, default=32, help="calibration windows (default 32)")
    group.add_argument("--calibration-length", type=int, default=512, help="tokens per calibration window (default 512)")


def compression_config_from_args(args: argparse.Namespace):
    """The CompressionConfig the arguments ask for, or None when no compression was asked."""
    if args.svd_ratio is None and args.svd_energy is None:
        return None
    from efedllm.compression.apply import CompressionConfig

    return CompressionConfig(
        ratio=args.svd_ratio,
        energy=args.svd_energy,
        method=args.svd_method,
        allocation=args.svd_allocation,
        algorithm=args.svd_algorithm,
        calibration_text=args.calibration_text,
        calibration_samples=args.calibration_samples,
        calibration_length=args.calibration_length,
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval-ppl", help="windowed perplexity of a model, optionally SVD-compressed")
    parser.add_argument("--model", default="smollm2-135m", help="alias, GGUF file or HF directory (default smollm2-135m)")
    parser.add_argument("--text", type=Path, help="text file (default: ../shared/data/wikitext2-test.raw)")
    parser.add_argument("--tokens", type=int, default=8192, help="evaluate the first N tokens (default 8192)")
    parser.add_argument("--window", type=int, default=1024, help="window length in tokens (default 1024)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    add_compression_arguments(parser)
    parser.set_defaults(func=run_eval_ppl)


def run_eval_ppl(args: argparse.Namespace) -> int:
    from efedllm.compression.perplexity import default_text_path

    text = args.text or default_text_path()
    if text is None:
        print("eval-ppl: no text: pass --text FILE (or provide ../shared/data/wikitext2-test.raw)", file=sys.stderr)
        return 2
    config = compression_config_from_args(args)
    if config is not None and config.calibration_text is None:
        from dataclasses import replace

        config = replace(config, calibration_text=text)
    result, report = evaluate_model(args.model, Path(text), config, args.tokens, args.window)
    record = {"model": args.model, "text": str(text), "tokens": args.tokens, "window": args.window, **result.to_dict()}
    if report is not None:
        record["compression"] = {"method": config.method.value, "ratio": config.ratio, "energy": config.energy, **report.summary()}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"perplexity {result.perplexity:.3f} over {result.predicted_tokens} predicted tokens in {result.windows} windows of {text}")
        if report is not None:
            print("compression: " + ", ".join(f"{key} {value}" for key, value in record["compression"].items()))
    return 0


def evaluate_model(model: str, text: Path, config, tokens: int, window: int):
    """(PerplexityResult, CompressionReport or None) for the whole model, compressed as one span."""
    from efedllm.compression.calibration import compress_span
    from efedllm.compression.perplexity import read_text, tokenize, windowed_perplexity
    from efedllm.models import load_client_parts, load_span

    client = load_client_parts(model)
    body = load_span(model, 0, client.config.num_hidden_layers)
    report = compress_span(body, model, config) if config is not None else None
    token_ids = tokenize(client.tokenizer, read_text(text))
    result = windowed_perplexity(lambda ids: client.logits(body(client.embed(ids))), token_ids, window, tokens)
    return result, report
