"""The ``efedllm`` command. Each subcommand's module registers its parser and builds its role's frozen
config from the arguments, checking them before any I/O; the role then runs.

Commands: ``generate`` (:mod:`.generate`), ``api`` (:mod:`.api`), ``serve`` and ``dht`` (:mod:`.serve`), ``demo`` and
``swarm up`` (:mod:`.swarm`), ``verify`` (:mod:`.verify`), ``ledger`` (:mod:`.ledger`),
``eval-ppl`` (:mod:`.eval_ppl`), ``analyze`` (:mod:`.analyze`).

Only the module of the command that runs is imported (``importlib``, below): the roles import
torch, transformers and hivemind (about 5 s here), which ``efedllm --help`` or ``efedllm ledger``
do not need. No efedllm module imports this package, so this dynamic import hides no cycle, and
each command module imports what it uses at its top, where the import-linter contracts see it.
"""

from __future__ import annotations

import importlib
import os
import sys

from efedllm.cli.parser import Parser, print_error
from efedllm.common.errors import EfedllmError
from efedllm.common.lean_imports import register_lean_hivemind

# command -> (the module that registers and runs it, its one-line help)
COMMANDS = {
    "generate": ("efedllm.cli.generate", "generate text, locally (--local) or through a swarm"),
    "serve": ("efedllm.cli.serve", "host a span of blocks in a swarm"),
    "dht": ("efedllm.cli.serve", "run a bootstrap-only DHT node"),
    "api": ("efedllm.cli.api", "serve an OpenAI-compatible API and a web UI over a swarm"),
    "demo": ("efedllm.cli.swarm", "start a local swarm, stream an answer, shut down"),
    "swarm": ("efedllm.cli.swarm", "manage a local swarm (swarm up)"),
    "verify": ("efedllm.cli.verify", "probe a swarm's servers, publish trust verdicts, credit rewards"),
    "ledger": ("efedllm.cli.ledger", "show reward balances and crediting history"),
    "finetune": ("efedllm.cli.finetune", "fine-tune LoRA adapters or soft prompts through a swarm (or --local)"),
    "eval-ppl": ("efedllm.cli.eval_ppl", "windowed perplexity of a model, optionally SVD-compressed"),
    "analyze": ("efedllm.cli.analyze", "reproduce and measure the paper's analyses (Theorem 4.1, Tables 2-3, Figs. 6-7, softmax check)"),
}


def build_parser(command: str | None = None) -> Parser:
    """The parser, with ``command``'s full arguments (its module imported) and the others by name and help only."""
    parser = Parser(prog="efedllm", description="Federated LLM inference across untrusting servers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register(subparsers)
    for name, (_, summary) in COMMANDS.items():
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # before torch loads libgomp: idle OpenMP workers spin briefly, then sleep, so a client or server waiting on
    # the network leaves the cores to whichever peer on this machine computes (server/swarm.py has the figures)
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((argument for argument in argv if not argument.startswith("-")), None)
    register_lean_hivemind()  # before any command module imports hivemind: none of its training packages
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (EfedllmError, ValueError, FileNotFoundError) as error:
        return print_error(args.command, error)
