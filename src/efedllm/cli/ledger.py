"""``efedllm ledger [--path PATH] [--json] [--epochs N]``: balances and crediting history of the reward ledger."""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from rich.console import Console
from rich.table import Table

from efedllm.cli.parser import positive_int
from efedllm.verifier.ledger import Ledger, LedgerError, default_ledger_path


def register(subparsers) -> None:
    """Add the ``ledger`` subcommand to the top-level CLI's subparsers."""
    parser = subparsers.add_parser("ledger", help="show reward balances and crediting history")
    parser.add_argument("--path", default=str(default_ledger_path()), help="ledger file (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--epochs", type=positive_int, default=20, help="how many recent epochs to show")
    parser.set_defaults(func=run_ledger)


def ledger_snapshot(ledger: Ledger, epochs: int) -> dict:
    """Everything ``efedllm ledger --json`` prints, as one JSON-ready mapping."""
    return {
        "path": str(ledger.path),
        "balances": [balance.__dict__ for balance in ledger.balances()],
        "epochs": ledger.epochs(epochs),
    }


def run_ledger(args: argparse.Namespace) -> int:
    try:
        with Ledger(args.path).open(create=False) as ledger:
            snapshot = ledger_snapshot(ledger, args.epochs)
    except LedgerError as error:
        print(f"efedllm ledger: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(snapshot))
    else:
        _print_tables(snapshot)
    return 0


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _print_tables(snapshot: dict) -> None:
    balances = Table(title=f"Balances — {snapshot['path']}")
    for column in ("server", "balance", "credited work", "pending work", "epochs"):
        balances.add_column(column, justify="left" if column == "server" else "right")
    for row in snapshot["balances"]:
        balances.add_row(
            row["peer_id"], f"{row['balance']:.4f}", str(row["credited_work"]), str(row["pending_work"]), str(row["epochs"])
        )
    history = Table(title="Credited epochs (newest first); work = tokens × blocks")
    for column in ("epoch", "closed", "server", "work", "score", "active", "credit"):
        history.add_column(column, justify="right" if column in ("work", "score", "credit") else "left")
    for epoch in snapshot["epochs"]:
        credits = epoch["credits"] or [None]
        for index, credit in enumerate(credits):
            head = (str(epoch["epoch"]), _when(epoch["closed_at"])) if index == 0 else ("", "")
            if credit is None:
                history.add_row(*head, "(no verified work)", "", "", "", "")
                continue
            history.add_row(
                *head,
                credit["peer_id"],
                str(credit["work"]),
                f"{credit['score']:.3f}",
                "yes" if credit["active"] else "no",
                f"{credit['amount']:.4f}",
            )
    console = Console()
    console.print(balances)
    console.print(history)
