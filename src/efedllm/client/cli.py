"""``efedllm generate``: generate text locally or through a swarm."""

from __future__ import annotations

import argparse
import json
import sys


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="pick the most likely token (no sampling)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the model's chat template")


def generation_config(args):
    from efedllm.client.sampling import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop_strings=tuple(args.stop),
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text, locally (--local) or through a swarm")
    parser.add_argument("prompt")
    parser.add_argument("--model", default="smollm2-135m", help="alias, .gguf path or HF directory")
    parser.add_argument("--local", action="store_true", help="run every block in this process")
    parser.add_argument("--spans", default=None, help="with --local: consecutive spans, e.g. 0:10,10:20,20:30")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of swarm peers")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--wire", default=None, choices=["float32", "bfloat16", "float16", "int8"])
    parser.add_argument("--relay", action="store_true", help="route every hop through the client (Petals' way)")
    parser.add_argument("--answer-along-chain", action="store_true",
                        help="chained steps answer back hop by hop instead of the last hop delivering to the client")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--trusted-verifiers", nargs="*", default=[], metavar="KEY",
                        help="verifier keys (hex, as `efedllm verify` prints) whose verdicts route around servers")
    parser.add_argument("--verifier-quorum", default="majority", help="any, majority, all or a number")
    parser.add_argument("--verify-fraction", type=float, default=0.0, metavar="P",
                        help="spot-check this share of steps on a second, disjoint chain; report mismatches to verifiers")
    add_generation_arguments(parser)
    from efedllm.compression.cli import add_compression_arguments

    add_compression_arguments(parser)
    parser.set_defaults(func=run_generate)


def span_transform(args, model: str):
    """A function that compresses a loaded span in place, or None when compression is off."""
    from efedllm.compression.cli import compression_config_from_args

    config = compression_config_from_args(args)
    if config is None:
        return None
    from efedllm.compression.serving import span_compressor

    return span_compressor(model, config)


def _print_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_generate(args) -> int:
    from efedllm.records import parse_spans

    config = generation_config(args)
    if args.local:
        from efedllm.client.local import LocalModelForCausalLM

        spans = parse_spans(args.spans) if args.spans else None
        model = LocalModelForCausalLM.load(args.model, spans, args.dtype, transform=span_transform(args, args.model))
    else:
        if not args.initial_peers:
            raise ValueError("give --initial-peers of a swarm, or --local to run every block here")
        from efedllm.client.remote import DistributedModelForCausalLM, RemoteClientConfig

        model = DistributedModelForCausalLM.from_pretrained(
            args.model,
            initial_peers=args.initial_peers,
            config=RemoteClientConfig(relay=args.relay, direct_delivery=not args.answer_along_chain, wire_format=args.wire, dtype=args.dtype,
                                      trusted_verifier_keys=tuple(args.trusted_verifiers),
                                      verifier_quorum=args.verifier_quorum, verify_fraction=args.verify_fraction),
        )
    try:
        input_ids = model.encode_prompt(args.prompt, chat=not args.no_chat)
        result = model.generate(input_ids, config, on_text=None if args.json else _print_stream)
    finally:
        getattr(model, "shutdown", lambda: None)()
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"\n[{result.new_tokens} tokens, {result.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0
