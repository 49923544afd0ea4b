"""``efedllm ledger [--path PATH] [--json] [--epochs N]``: balances, crediting history and clawbacks of the ledger.

A balance is the credits minus what was clawed back from a server caught lying; the clawed-back
amount and the forfeited (never paid) work are shown beside it, and each clawback with its reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from rich.console import Console
from rich.markup import escape
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
        "clawbacks": [clawback.__dict__ for clawback in ledger.clawbacks()],
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
    console = Console()
    console.print(_balances_table(snapshot))
    console.print(_history_table(snapshot))
    if snapshot["clawbacks"]:  # most ledgers never have one; no empty table for them
        console.print(_clawbacks_table(snapshot))


def _balances_table(snapshot: dict) -> Table:
    balances = Table(title=f"Balances — {snapshot['path']}; balance = credits − clawed back")
    columns = ("server", "balance", "clawed back", "credited work", "pending work", "forfeited work", "epochs")
    for column in columns:
        balances.add_column(column, justify="left" if column == "server" else "right")
    for row in snapshot["balances"]:
        balances.add_row(
            row["peer_id"],
            f"{row['balance']:.4f}",
            f"{row['clawed_back']:.4f}",
            str(row["credited_work"]),
            str(row["pending_work"]),
            str(row["forfeited_work"]),
            str(row["epochs"]),
        )
    return balances


def _history_table(snapshot: dict) -> Table:
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
    return history


def _clawbacks_table(snapshot: dict) -> Table:
    clawbacks = Table(title="Clawbacks (oldest first): credits taken back, unpaid work forfeited")
    for column in ("when", "server", "epoch", "kind", "amount", "work", "reason"):
        clawbacks.add_column(column, justify="right" if column in ("epoch", "amount", "work") else "left")
    for row in snapshot["clawbacks"]:
        clawbacks.add_row(
            _when(row["clawed_at"]),
            row["peer_id"],
            str(row["epoch"]),
            "credit" if row["kind"] == "credit" else "forfeited work",
            f"{row['amount']:.4f}",
            str(row["work"]),
            escape(row["reason"]),  # free text from a verifier: shown as written, never read as rich markup
        )
    return clawbacks
