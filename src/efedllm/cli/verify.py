"""``efedllm verify``: run a verifier node that probes a swarm's servers and publishes signed verdicts."""

from __future__ import annotations

import argparse
import json
import signal

from efedllm.cli.arguments import add_identity, add_initial_peers, add_model
from efedllm.cli.parser import ipv4_host, port, positive_int
from efedllm.models.weights import model_blocks
from efedllm.verifier.config import DEFAULT_PROBE_DECODE_STEPS, VerifierConfig
from efedllm.verifier.ledger import default_ledger_path
from efedllm.verifier.node import Verifier, VerifierNodeConfig


def register(subparsers) -> None:
    parser = subparsers.add_parser("verify", help="probe a swarm's servers, publish trust verdicts, credit rewards")
    add_model(parser)
    add_initial_peers(parser, required=True)
    parser.add_argument("--host", type=ipv4_host, default="127.0.0.1")
    parser.add_argument("--port", type=port, default=0)
    parser.add_argument("--rounds", type=positive_int, default=None, help="stop after N rounds (default: until Ctrl-C)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between the starts of two rounds")
    parser.add_argument("--jitter", type=float, default=1.0, help="at most this many seconds between two probes")
    parser.add_argument("--decode-steps", type=int, default=DEFAULT_PROBE_DECODE_STEPS, help="one-token steps after each probe's prefill")
    parser.add_argument("--ledger", default=str(default_ledger_path()), help="reward ledger (default: %(default)s)")
    parser.add_argument("--policy", default="robust", choices=["robust", "paper"])
    parser.add_argument("--theta", type=float, default=0.8, help="activation threshold θ (paper eq. 4)")
    parser.add_argument("--window", type=positive_int, default=50, help="probes per server behind acc_i")
    parser.add_argument("--confidence", type=float, default=0.99, help="robust policy's one-sided confidence")
    parser.add_argument("--epoch-seconds", type=float, default=3600.0)
    parser.add_argument("--reward", type=float, default=100.0, help="reward split per epoch")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--torch-threads", type=positive_int, default=1, metavar="N",
                        help="compute threads for probes and audits (default: %(default)s, leaving the other cores to servers)")
    add_identity(parser, "the verifier")
    parser.set_defaults(func=run_verify)


def build_config(args: argparse.Namespace) -> VerifierNodeConfig:
    model_blocks(args.model)  # the verifier loads the whole model: it must exist before anything starts
    decisions = VerifierConfig(theta=args.theta, policy=args.policy, window=args.window, confidence=args.confidence,
                               probe_interval_s=args.interval, epoch_seconds=args.epoch_seconds,
                               reward_per_epoch=args.reward, ledger_path=args.ledger)
    return VerifierNodeConfig(model=args.model, initial_peers=tuple(args.initial_peers), host=args.host, port=args.port,
                              rounds=args.rounds, decode_steps=args.decode_steps, jitter_s=args.jitter,
                              seed=args.seed, decisions=decisions, identity_path=args.identity,
                              torch_threads=args.torch_threads)


def run_verify(args: argparse.Namespace) -> int:
    verifier = Verifier(build_config(args))
    try:
        verifier.start()
        print(f"efedllm verifier key: {verifier.key}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: verifier.stop())
        verifier.run(on_round=lambda report: print(json.dumps(report.to_json()), flush=True))
    finally:
        verifier.shutdown()
    return 0
