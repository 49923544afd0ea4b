"""``efedllm generate``: generate text locally (``--local``) or through a swarm."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from efedllm.cli import arguments
from efedllm.cli.parser import fraction, positive_int
from efedllm.client.config import RemoteClientConfig
from efedllm.client.finetune import load_adapter
from efedllm.client.local import LocalModelForCausalLM, check_covering
from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.client.sampling import GenerationConfig
from efedllm.common.spans import parse_spans
from efedllm.compression.calibration import compress_span
from efedllm.models.weights import model_blocks
from efedllm.protocol.codec import WIRE_FORMATS


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--greedy", action="store_true", help="pick the most likely token (no sampling)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the model's chat template")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                            seed=args.seed, stop_strings=tuple(args.stop))


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text, locally (--local) or through a swarm")
    parser.add_argument("prompt", nargs="?", default=None)
    parser.add_argument("--prompts-file", type=Path, default=None, metavar="FILE",
                        help="generate for every prompt of FILE at once (one a line, or JSONL with a \"prompt\" each); "
                             "prints one JSON line per prompt")
    parser.add_argument("--stream", action="store_true",
                        help="with --prompts-file: also print {\"index\", \"delta\"} JSON lines as text arrives")
    arguments.add_model(parser)
    parser.add_argument("--local", action="store_true", help="run every block in this process")
    parser.add_argument("--spans", default=None, help="with --local: consecutive spans, e.g. 0:10,10:20,20:30")
    arguments.add_initial_peers(parser)
    arguments.add_dtype(parser, quant=True)
    parser.add_argument("--wire", default=None, choices=list(WIRE_FORMATS))
    parser.add_argument("--relay", action="store_true", help="route every hop through the client (Petals' way)")
    parser.add_argument("--answer-along-chain", action="store_true",
                        help="chained steps answer back hop by hop instead of the last hop delivering to the client")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--adapter", type=Path, default=None, metavar="FILE",
                        help="generate with a fine-tuned adapter (efedllm finetune --save); prompt tuning runs in ordinary "
                             "KV-cached sessions, LoRA and deep prompts as requests the servers apply it to (no KV "
                             "cache: every token resends the sequence)")
    arguments.add_trusted_verifiers(parser, "route around servers")
    parser.add_argument("--audit-fraction", type=fraction, default=RemoteClientConfig().audit_fraction, metavar="P",
                        help="with --trusted-verifiers: steps carry signed receipts and this share of sessions is "
                             "sent to a verifier to recompute (0: no receipts, no audits)")
    parser.add_argument("--verify-fraction", type=fraction, default=0.0, metavar="P",
                        help="spot-check this share of steps on a second, disjoint chain; report mismatches to verifiers")
    add_generation_arguments(parser)
    arguments.add_compression_arguments(parser)
    parser.set_defaults(func=run_generate)


def remote_config(args: argparse.Namespace) -> RemoteClientConfig:
    return RemoteClientConfig(relay=args.relay, direct_delivery=not args.answer_along_chain, wire_format=args.wire,
                              dtype=args.dtype, trusted_verifier_keys=tuple(args.trusted_verifiers),
                              verifier_quorum=args.verifier_quorum, verify_fraction=args.verify_fraction,
                              audit_fraction=args.audit_fraction)


def _print_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _load_model(args: argparse.Namespace):
    """The local pipeline or the distributed client; every argument is checked before either loads."""
    blocks = model_blocks(args.model)
    if not args.local:
        if args.spans or args.svd_ratio is not None or args.svd_energy is not None or args.quant:
            raise ValueError("--spans, --svd-* and --quant go with --local (a swarm's servers compress and quantise their own spans)")
        if not args.initial_peers:
            raise ValueError("give --initial-peers of a swarm, or --local to run every block here")
        return DistributedModelForCausalLM.from_pretrained(args.model, args.initial_peers, remote_config(args))
    spans = parse_spans(args.spans) if args.spans else None
    if spans is not None:
        check_covering(spans, blocks)
    compression = arguments.compression_config_from_args(args)
    transform = None if compression is None else (lambda span: compress_span(span, args.model, compression))
    return LocalModelForCausalLM.load(args.model, spans, args.dtype, transform=transform, quant=args.quant)


def read_prompts(path: Path) -> list[str]:
    """The prompts of a file: JSONL (``{"prompt": ...}`` or a JSON string per line) when every non-empty line
    is JSON, else one prompt per non-empty line; ValueError naming the file and line when it holds none or a
    JSON line has no prompt."""
    if not path.is_file():
        raise ValueError(f"--prompts-file {path}: no such file")
    lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"--prompts-file {path} holds no prompts")
    if not all(line.lstrip().startswith(("{", '"')) for _, line in lines):
        return [line for _, line in lines]
    prompts = []
    for number, line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"--prompts-file {path}, line {number}: not JSON ({error})") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"--prompts-file {path}, line {number}: needs a non-empty \"prompt\" string")
        prompts.append(prompt)
    return prompts


def _check_prompt_arguments(args: argparse.Namespace) -> list[str] | None:
    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give a prompt or --prompts-file, not both")
    if args.stream and args.prompts_file is None:
        raise ValueError("--stream goes with --prompts-file (a single prompt streams its text anyway)")
    return read_prompts(args.prompts_file) if args.prompts_file is not None else None


def _stream_row(row: int, text: str) -> None:
    print(json.dumps({"index": row, "delta": text}), flush=True)


def run_generate_batch(model, prompts: list[str], config: GenerationConfig, args: argparse.Namespace) -> None:
    results = model.generate_batch(prompts, config, on_text=_stream_row if args.stream else None, chat=not args.no_chat)
    for index, (prompt, result) in enumerate(zip(prompts, results)):
        print(json.dumps({"index": index, "prompt": prompt, **result.to_json()}), flush=True)


def read_adapter(path: Path | None, model_name: str):
    """(spec, tensors) of ``--adapter``, or None; ValueError when the file is missing, foreign or of another model."""
    if path is None:
        return None
    if not path.is_file():
        raise ValueError(f"--adapter {path}: no such file")
    spec, tensors, trained_on = load_adapter(path)
    if trained_on != model_name:
        raise ValueError(f"--adapter {path} was trained on {trained_on}, not {model_name}")
    return spec, tensors


def run_generate_adapted(model, adapted, prompts: list[str], config: GenerationConfig, args: argparse.Namespace) -> None:
    for index, prompt in enumerate(prompts):
        result = model.generate_adapted(adapted, model.encode_prompt(prompt, chat=not args.no_chat), config)
        print(json.dumps({"index": index, "prompt": prompt, **result.to_json()}), flush=True)


def run_generate(args: argparse.Namespace) -> int:
    config = generation_config(args)
    prompts = _check_prompt_arguments(args)
    adapter = read_adapter(args.adapter, args.model)
    model = _load_model(args)
    adapted = model.trainable(*adapter) if adapter is not None else None
    if prompts is not None:
        try:
            if adapted is not None:
                run_generate_adapted(model, adapted, prompts, config, args)
            else:
                run_generate_batch(model, prompts, config, args)
        finally:
            getattr(model, "shutdown", lambda: None)()
        return 0
    try:
        input_ids = model.encode_prompt(args.prompt, chat=not args.no_chat)
        on_text = None if args.json else _print_stream
        result = model.generate(input_ids, config, on_text=on_text) if adapted is None else \
            model.generate_adapted(adapted, input_ids, config, on_text=on_text)
    finally:
        getattr(model, "shutdown", lambda: None)()
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"\n[{result.new_tokens} tokens, {result.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0
