"""``efedllm demo`` (a local swarm answers one prompt) and ``efedllm swarm up`` (a local swarm stays up)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time

from rich.console import Console
from rich.table import Table

from efedllm.cli.api import add_api_arguments, api_config, serve_until_interrupted
from efedllm.cli.arguments import add_model
from efedllm.cli.parser import positive_int
from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.client.sampling import GenerationConfig
from efedllm.dht.records import ServerInfo
from efedllm.models.weights import model_blocks
from efedllm.server.swarm import LocalSwarm, even_spans, machine_cores, threads_per_server


def register(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="start a local swarm, stream an answer, shut down")
    _add_swarm_arguments(demo)
    demo.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    demo.add_argument("--max-new-tokens", type=positive_int, default=48)
    demo.set_defaults(func=run_demo)

    swarm = subparsers.add_parser("swarm", help="manage a local swarm")
    swarm_commands = swarm.add_subparsers(dest="swarm_command", required=True)
    up = swarm_commands.add_parser("up", help="start a local swarm and keep it up until Ctrl-C")
    _add_swarm_arguments(up)
    up.add_argument("--api", action="store_true", help="also serve the OpenAI-compatible API and web UI; prints its URL")
    up.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    add_api_arguments(up)
    up.set_defaults(func=run_swarm_up)


def _add_swarm_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    parser.add_argument("--servers", type=positive_int, default=3)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM, like Ctrl-C, must shut the servers down: they run in sessions of their own


def _start_swarm(args: argparse.Namespace) -> LocalSwarm:
    total = model_blocks(args.model)
    if args.servers > total:
        raise ValueError(f"--servers {args.servers} exceeds the model's {total} blocks")
    signal.signal(signal.SIGTERM, _interrupt)
    swarm = LocalSwarm(args.model)
    try:
        swarm.start_bootstrap()
        for span in even_spans(total, args.servers):
            threads = threads_per_server(args.servers, machine_cores())  # the servers share this machine's cores
            swarm.start_server(str(span), extra=["--no-rebalance", "--torch-threads", str(threads)])
        print(f"starting {args.servers} servers (logs in {swarm.log_dir}) ...", file=sys.stderr, flush=True)
        swarm.wait_until_online(args.servers)
    except BaseException:
        swarm.shutdown()
        raise
    return swarm


def print_server_table(records: dict[str, ServerInfo]) -> None:
    table = Table(title="servers")
    for column in ("peer id", "blocks", "tokens/s", "state", "dtype"):
        table.add_column(column)
    for info in sorted(records.values(), key=lambda info: info.span):
        table.add_row(info.peer_id[-12:], str(info.span), f"{info.throughput:.1f}", info.state.value, info.dtype)
    Console(stderr=True).print(table)


def run_demo(args: argparse.Namespace) -> int:
    swarm = _start_swarm(args)
    model = None
    try:
        model = DistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
        print(f"prompt: {args.prompt}\nanswer: ", end="", flush=True)
        result = model.generate(
            model.encode_prompt(args.prompt), GenerationConfig(max_new_tokens=args.max_new_tokens, greedy=True),
            on_text=lambda text: print(text, end="", flush=True),
        )
        print(f"\n[{result.new_tokens} tokens, {result.tokens_per_s:.1f} tokens/s through {args.servers} servers]")
        print_server_table(swarm.server_records()[0])
    finally:
        if model is not None:
            model.shutdown()
        swarm.shutdown()
    return 0


def run_swarm_up(args: argparse.Namespace) -> int:
    config = api_config(args, ["/ip4/127.0.0.1/tcp/1/p2p/placeholder"]) if args.api else None  # arguments checked first
    swarm = _start_swarm(args)
    try:
        print_server_table(swarm.server_records()[0])
        if config is not None:
            config = dataclasses.replace(config, initial_peers=tuple(swarm.initial_peers))
            serve_until_interrupted(config, {"initial_peers": swarm.initial_peers})
            return 0
        print(json.dumps({"initial_peers": swarm.initial_peers}), flush=True)
        print("swarm is up; Ctrl-C to stop", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        swarm.shutdown()
    return 0
