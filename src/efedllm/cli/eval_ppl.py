"""``efedllm eval-ppl``: windowed perplexity of a model, optionally SVD-compressed."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from efedllm.cli.arguments import add_compression_arguments, add_dtype, add_initial_peers, add_model, compression_config_from_args
from efedllm.cli.generate import read_adapter
from efedllm.client.config import RemoteClientConfig
from efedllm.client.local import LocalModelForCausalLM
from efedllm.client.remote import DistributedModelForCausalLM
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
    parser.add_argument("--adapter", type=Path, default=None, metavar="FILE",
                        help="evaluate with a fine-tuned adapter (efedllm finetune --save); with --initial-peers "
                             "through a swarm, whose servers apply it to each request only")
    add_initial_peers(parser)
    add_compression_arguments(parser)
    parser.set_defaults(func=run_eval_ppl)


def run_eval_ppl(args: argparse.Namespace) -> int:
    text = args.text or default_text_path()
    if text is None or not Path(text).is_file():
        raise ValueError(f"no text {text or ''}: pass --text FILE (or provide ../shared/data/wikitext2-test.raw)")
    model_blocks(args.model)
    config = compression_config_from_args(args)
    if args.adapter is not None or args.initial_peers:
        return run_adapted_eval(args, Path(text), config)
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


def run_adapted_eval(args: argparse.Namespace, text: Path, config: CompressionConfig | None) -> int:
    """Perplexity with ``--adapter`` (or of the bare model through ``--initial-peers``), locally or through a swarm."""
    if config is not None or args.quant is not None:
        raise ValueError("--adapter and --initial-peers go without --svd-* and --quant")
    if args.adapter is None:
        raise ValueError("--initial-peers goes with --adapter (eval-ppl of the bare model runs locally)")
    adapter = read_adapter(args.adapter, args.model)
    model = DistributedModelForCausalLM.from_pretrained(args.model, args.initial_peers, RemoteClientConfig(dtype=args.dtype)) \
        if args.initial_peers else LocalModelForCausalLM.load(args.model, dtype=args.dtype)
    try:
        adapted = model.trainable(*adapter)
        token_ids = tokenize(model.parts.tokenizer, read_text(text))
        result = windowed_perplexity(lambda ids: adapted(ids).logits, token_ids, args.window, args.tokens)
    finally:
        getattr(model, "shutdown", lambda: None)()
    record = {"model": args.model, "text": str(text), "tokens": args.tokens, "window": args.window, "dtype": args.dtype,
              "adapter": str(args.adapter), "method": adapter[0].method, "through": "swarm" if args.initial_peers else "local",
              **result.to_dict()}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"perplexity {result.perplexity:.3f} with adapter {args.adapter} over {result.predicted_tokens} predicted tokens")
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
