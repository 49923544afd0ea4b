"""``efedllm ledger``: registered on a parser, one JSON object with --json, tables for humans."""

import argparse
import json

import pytest

from efedllm.cli.ledger import register
from efedllm.verifier.ledger import Ledger


def parse(*argv):
    parser = argparse.ArgumentParser(prog="efedllm")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


@pytest.fixture
def ledger_path(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.record_work("peer-a", tokens=10, blocks=30, epoch=1)
        ledger.record_work("peer-b", tokens=10, blocks=10, epoch=1)
        ledger.close_epoch(1, {"peer-a": 1.0, "peer-b": 1 / 3}, {"peer-a", "peer-b"}, 100.0)
        ledger.record_work("peer-a", tokens=5, blocks=30, epoch=2)
    return path


def test_json_output_is_one_object_with_balances_and_history(ledger_path, capsys):
    args = parse("ledger", "--path", str(ledger_path), "--json")
    assert args.func(args) == 0
    snapshot = json.loads(capsys.readouterr().out)
    balances = {row["peer_id"]: row for row in snapshot["balances"]}
    assert balances["peer-a"]["balance"] == pytest.approx(75.0) and balances["peer-a"]["pending_work"] == 150
    assert balances["peer-b"]["balance"] == pytest.approx(25.0)
    (epoch,) = snapshot["epochs"]
    assert epoch["epoch"] == 1 and len(epoch["credits"]) == 2


def test_tables_for_humans(ledger_path, capsys):
    args = parse("ledger", "--path", str(ledger_path))
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "peer-a" in out and "75.0000" in out and "Balances" in out


def test_missing_ledger_is_a_clear_error_and_creates_nothing(tmp_path, capsys):
    path = tmp_path / "absent.sqlite"
    args = parse("ledger", "--path", str(path), "--json")
    assert args.func(args) == 1
    assert "no ledger at" in capsys.readouterr().err and not path.exists()


def test_bad_epoch_count_is_rejected(capsys):
    with pytest.raises(SystemExit):
        parse("ledger", "--epochs", "0")
    assert "positive integer" in capsys.readouterr().err
