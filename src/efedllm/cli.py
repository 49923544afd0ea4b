"""The ``efedllm`` command: each role's package registers its own subcommands.

This module only builds the argument parser; every subcommand turns its arguments into the
role's frozen config and runs it. Heavy imports happen inside the subcommands.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

ROLE_CLIS = (
    "efedllm.client.cli",
    "efedllm.server.cli",
    "efedllm.verifier.cli",
    "efedllm.verifier.node_cli",
    "efedllm.compression.cli",
    "efedllm.analysis.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="efedllm", description="Federated LLM inference across untrusting servers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in ROLE_CLIS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as error:
        print(f"efedllm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
