"""``efedllm api``: an OpenAI-compatible HTTP server and web UI over a swarm (:mod:`efedllm.api`)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from efedllm.api.app import ApiServer
from efedllm.api.config import ApiConfig
from efedllm.cli import arguments
from efedllm.cli.parser import port, positive_float, positive_int
from efedllm.client.config import RemoteClientConfig


def register(subparsers) -> None:
    parser = subparsers.add_parser("api", help="serve an OpenAI-compatible API and a web UI over a swarm")
    arguments.add_initial_peers(parser)
    add_api_arguments(parser)
    arguments.add_model(parser)
    arguments.add_dtype(parser)
    arguments.add_trusted_verifiers(parser, "route around servers (and mark verdicts trusted in the monitor)")
    parser.set_defaults(func=run_api)


def add_api_arguments(parser: argparse.ArgumentParser) -> None:
    """The API's own arguments (also those of ``efedllm swarm up --api``)."""
    group = parser.add_argument_group("API")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    group.add_argument("--port", type=port, default=8000, help="port to listen on, 0 for any free one (default %(default)s)")
    group.add_argument("--api-key", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 routes")
    group.add_argument("--max-rows", type=positive_int, default=32,
                       help="choices of all requests generating together (default %(default)s)")
    group.add_argument("--max-pending", type=positive_int, default=64,
                       help="requests that may wait beyond them; more get 429 (default %(default)s)")
    group.add_argument("--default-max-tokens", type=positive_int, default=256,
                       help="tokens a request that names no max_tokens may generate (default %(default)s)")
    group.add_argument("--max-context", type=positive_int, default=None,
                       help="prompt + completion tokens at most (default: the model's context)")
    group.add_argument("--ledger", default=None, metavar="PATH", help="a verifier's ledger whose balances the monitor shows")
    group.add_argument("--probe-interval", type=positive_float, default=15.0,
                       help="seconds between the monitor's measurements of each server (default %(default)s)")


def api_config(args: argparse.Namespace, initial_peers: list[str]) -> ApiConfig:
    client = RemoteClientConfig(dtype=args.dtype, trusted_verifier_keys=tuple(getattr(args, "trusted_verifiers", ())),
                                verifier_quorum=getattr(args, "verifier_quorum", "majority"))
    return ApiConfig(model=args.model, initial_peers=tuple(initial_peers), host=args.host, port=args.port,
                     api_key=args.api_key, max_rows=args.max_rows, max_pending=args.max_pending,
                     default_max_tokens=args.default_max_tokens, max_context=args.max_context, ledger_path=args.ledger,
                     probe_interval=args.probe_interval, client=client)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_until_interrupted(config: ApiConfig, extra: dict | None = None) -> None:
    """Starts the API, prints ``{"url": ...}`` as one JSON line, serves until Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, _interrupt)
    server = ApiServer(config)
    try:
        server.start()
        print(json.dumps({"url": server.url, "model": config.model, **(extra or {})}), flush=True)
        print(f"API and web UI at {server.url}/ ; Ctrl-C to stop", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


def run_api(args: argparse.Namespace) -> int:
    if not args.initial_peers:
        raise ValueError("give --initial-peers of a swarm (efedllm swarm up prints them)")
    serve_until_interrupted(api_config(args, args.initial_peers))
    return 0
