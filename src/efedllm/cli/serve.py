"""``efedllm serve`` (host a span of blocks) and ``efedllm dht`` (a bootstrap-only DHT node)."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from efedllm.cli import arguments
from efedllm.cli.parser import ipv4_host, port, positive_float, positive_int, span
from efedllm.dht.identity import Identity, start_dht
from efedllm.models.weights import model_blocks
from efedllm.protocol.codec import WIRE_FORMATS
from efedllm.server.batching import BatchLimits
from efedllm.server.config import ServerConfig
from efedllm.server.faults import FAULT_HELP
from efedllm.server.server import Server
from efedllm.server.memory import pin_mmap_threshold


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="host a span of blocks in a swarm")
    arguments.add_model(serve)
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--blocks", type=span, help="the span to host, e.g. 0:10")
    where.add_argument("--num-blocks", type=positive_int, help="host this many blocks where the swarm is thinnest")
    arguments.add_initial_peers(serve)
    serve.add_argument("--host", type=ipv4_host, default="127.0.0.1")
    serve.add_argument("--port", type=port, default=0)
    serve.add_argument("--announce-maddrs", nargs="+", default=[], metavar="MADDR",
                       help="addresses other peers dial instead of --host/--port (behind NAT, port forwarding or a relay), "
                            "e.g. /ip4/203.0.113.5/tcp/31337")
    serve.add_argument("--metrics-port", type=port, default=None, metavar="PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; default: none)")
    arguments.add_dtype(serve, quant=True)
    serve.add_argument("--max-sessions", type=positive_int, default=16)
    serve.add_argument("--max-sessions-per-peer", type=positive_int, default=None, metavar="N",
                       help="sessions one peer may hold (default: half of --max-sessions)")
    serve.add_argument("--max-batch", type=positive_int, default=16, metavar="ROWS", help="rows per session")
    serve.add_argument("--batch-max-rows", type=positive_int, default=BatchLimits.max_rows, metavar="ROWS",
                       help="rows of concurrent sessions' decode steps merged into one pass")
    serve.add_argument("--batch-max-tokens", type=positive_int, default=BatchLimits.max_tokens, metavar="N",
                       help="rows x tokens of one pass; longer prefills run in chunks between decode passes")
    serve.add_argument("--prefill-chunk", type=positive_int, default=BatchLimits.min_chunk, metavar="TOKENS",
                       help="tokens of a waiting prefill that run in every pass, however full")
    serve.add_argument("--cache-budget-mb", type=positive_float, default=None, metavar="MB",
                       help="KV-cache budget (default: --max-sessions sessions of 2048 tokens at batch 1)")
    serve.add_argument("--wire", nargs="+", default=list(WIRE_FORMATS), choices=list(WIRE_FORMATS),
                       help="wire formats this server accepts")
    serve.add_argument("--fault", default=None, help=FAULT_HELP)
    serve.add_argument("--fault-seed", type=int, default=0, metavar="N",
                       help="seed of the fault's random draws (servers with one fault spec cheat independently)")
    arguments.add_trusted_verifiers(serve, "this server obeys")
    serve.add_argument("--weights-from", metavar="PEER",
                       help="fetch this span's weights from that server (peer id) instead of the model file")
    serve.add_argument("--torch-threads", type=positive_int, default=None, metavar="N",
                       help="compute threads (default: torch's own, every core; 1 when servers share a machine's cores: "
                            "a decode step is memory-bound, benchmarks/swarm_vs_local.py)")
    serve.add_argument("--no-rebalance", action="store_true")
    serve.add_argument("--announce-interval", type=float, default=5.0)
    serve.add_argument("--rebalance-interval", type=float, default=10.0)
    serve.add_argument("--ready-file", type=Path, default=None, metavar="PATH",
                       help="write this server's peer id, span and addresses (JSON) there once it is online")
    arguments.add_identity(serve, "the server")
    arguments.add_compression_arguments(serve)
    serve.set_defaults(func=run_serve)

    dht = subparsers.add_parser("dht", help="run a bootstrap-only DHT node")
    dht.add_argument("--host", type=ipv4_host, default="127.0.0.1")
    dht.add_argument("--port", type=port, default=0)
    dht.set_defaults(func=run_dht)


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig the arguments ask for; raises ValueError naming what is wrong (nothing is started)."""
    blocks = model_blocks(args.model)
    if args.blocks is not None and args.blocks.end > blocks:
        raise ValueError(f"--blocks {args.blocks} exceeds the model's {blocks} blocks")
    if args.num_blocks is not None and args.num_blocks > blocks:
        raise ValueError(f"--num-blocks {args.num_blocks} exceeds the model's {blocks} blocks")
    if args.ready_file is not None and not args.ready_file.parent.is_dir():
        raise ValueError(f"--ready-file {args.ready_file}: no folder {args.ready_file.parent}")
    return ServerConfig(
        model=args.model, blocks=args.blocks, num_blocks=args.num_blocks, initial_peers=tuple(args.initial_peers),
        host=args.host, port=args.port, announce_maddrs=tuple(args.announce_maddrs), dtype=args.dtype, quant=args.quant, max_sessions=args.max_sessions, wire_formats=tuple(args.wire),
        fault=args.fault, fault_seed=args.fault_seed, rebalance=not args.no_rebalance, announce_interval=args.announce_interval,
        rebalance_interval=args.rebalance_interval, compression=arguments.compression_config_from_args(args),
        weights_from=args.weights_from, torch_threads=args.torch_threads,
        trusted_verifier_keys=tuple(args.trusted_verifiers), verifier_quorum=args.verifier_quorum,
        ready_file=args.ready_file, identity_path=args.identity, cache_budget_mb=args.cache_budget_mb,
        max_batch=args.max_batch, max_sessions_per_peer=args.max_sessions_per_peer,
        batch_limits=BatchLimits(args.batch_max_rows, args.batch_max_tokens, args.prefill_chunk),
        metrics_port=args.metrics_port,
    )


def run_serve(args: argparse.Namespace) -> int:
    config = server_config(args)
    pin_mmap_threshold()  # this process is the server: loading's temporaries must not stay in its heap
    Server(config).run()
    return 0


def run_dht(args: argparse.Namespace) -> int:
    dht = start_dht(Identity.generate(), host_maddrs=[f"/ip4/{args.host}/tcp/{args.port}"])
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
