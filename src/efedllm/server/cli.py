"""``efedllm serve``, ``efedllm dht``, ``efedllm demo`` and ``efedllm swarm up``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from efedllm.wire import WIRE_FORMATS


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="host a span of blocks in a swarm")
    serve.add_argument("--model", default="smollm2-135m")
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--blocks", help="the span to host, e.g. 0:10")
    where.add_argument("--num-blocks", type=int, help="host this many blocks where the swarm is thinnest")
    serve.add_argument("--initial-peers", nargs="*", default=[])
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    serve.add_argument("--max-sessions", type=int, default=16)
    serve.add_argument("--wire", nargs="*", default=list(WIRE_FORMATS), choices=list(WIRE_FORMATS),
                       help="wire formats this server accepts")
    serve.add_argument("--fault", default=None, help="inject a fault (verifier tests): noise:SIGMA, zeros, ...")
    serve.add_argument("--trusted-verifiers", nargs="*", default=[], metavar="KEY",
                       help="verifier keys (hex, as `efedllm verify` prints) whose verdicts this server obeys")
    serve.add_argument("--verifier-quorum", default="majority", help="any, majority, all or a number")
    serve.add_argument("--weights-from", metavar="PEER",
                       help="fetch this span's weights from that server (peer id) instead of the model file")
    serve.add_argument("--torch-threads", type=int, default=None, metavar="N",
                       help="compute threads (default 1: decode is memory-bound, and local swarms share cores)")
    serve.add_argument("--no-rebalance", action="store_true")
    serve.add_argument("--announce-interval", type=float, default=5.0)
    serve.add_argument("--rebalance-interval", type=float, default=10.0)
    from efedllm.compression.cli import add_compression_arguments

    add_compression_arguments(serve)
    serve.set_defaults(func=run_serve)

    dht = subparsers.add_parser("dht", help="run a bootstrap-only DHT node")
    dht.add_argument("--host", default="127.0.0.1")
    dht.add_argument("--port", type=int, default=0)
    dht.set_defaults(func=run_dht)

    demo = subparsers.add_parser("demo", help="start a local swarm, stream an answer, shut down")
    _add_swarm_arguments(demo)
    demo.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.set_defaults(func=run_demo)

    swarm = subparsers.add_parser("swarm", help="manage a local swarm")
    swarm_commands = swarm.add_subparsers(dest="swarm_command", required=True)
    up = swarm_commands.add_parser("up", help="start a local swarm and keep it up until Ctrl-C")
    _add_swarm_arguments(up)
    up.set_defaults(func=run_swarm_up)


def _add_swarm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--servers", type=int, default=3)


def run_serve(args) -> int:
    from efedllm.records import Span
    from efedllm.server.config import ServerConfig
    from efedllm.server.server import Server

    from efedllm.compression.cli import compression_config_from_args

    compression = compression_config_from_args(args)
    config = ServerConfig(
        model=args.model,
        blocks=Span.parse(args.blocks) if args.blocks else None,
        num_blocks=args.num_blocks,
        initial_peers=tuple(args.initial_peers),
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        max_sessions=args.max_sessions,
        wire_formats=tuple(args.wire),
        fault=args.fault,
        rebalance=not args.no_rebalance,
        announce_interval=args.announce_interval,
        rebalance_interval=args.rebalance_interval,
        compression=compression,
        weights_from=args.weights_from,
        torch_threads=args.torch_threads,
        trusted_verifier_keys=tuple(args.trusted_verifiers),
        verifier_quorum=args.verifier_quorum,
    )
    Server(config).run()
    return 0


def run_dht(args) -> int:
    import signal
    import threading

    from hivemind.dht import DHT
    from hivemind.dht.crypto import RSASignatureValidator

    dht = DHT(start=True, host_maddrs=[f"/ip4/{args.host}/tcp/{args.port}"], record_validators=[RSASignatureValidator()])
    for maddr in dht.get_visible_maddrs():
        print(f"efedllm dht: --initial-peers {maddr}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    dht.shutdown()
    return 0


def _start_swarm(args):
    from efedllm.models.sources import resolve_model
    from efedllm.models.weights import load_config
    from efedllm.server.swarm import LocalSwarm, even_spans

    if args.servers < 1:
        raise ValueError("--servers must be >= 1")
    swarm = LocalSwarm(args.model)
    swarm.start_bootstrap()
    total = load_config(resolve_model(args.model)).num_hidden_layers
    for span in even_spans(total, args.servers):
        swarm.start_server(str(span), extra=["--no-rebalance"])
    print(f"starting {args.servers} servers (logs in {swarm.log_dir}) ...", file=sys.stderr, flush=True)
    swarm.wait_until_online(args.servers)
    return swarm


def print_server_table(records: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="servers")
    for column in ("peer id", "blocks", "tokens/s", "state", "dtype"):
        table.add_column(column)
    for info in sorted(records.values(), key=lambda info: info.span):
        table.add_row(info.peer_id[-12:], str(info.span), f"{info.throughput:.1f}", info.state.value, info.dtype)
    Console(stderr=True).print(table)


def run_demo(args) -> int:
    from efedllm.client.remote import DistributedModelForCausalLM
    from efedllm.client.sampling import GenerationConfig

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


def run_swarm_up(args) -> int:
    swarm = _start_swarm(args)
    try:
        print_server_table(swarm.server_records()[0])
        print(json.dumps({"initial_peers": swarm.initial_peers}), flush=True)
        print("swarm is up; Ctrl-C to stop", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        swarm.shutdown()
    return 0
