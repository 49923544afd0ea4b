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


REASON = "[bold]signed proof[/bold] of a wrong step"  # brackets: must print as written, not as rich markup


@pytest.fixture
def clawed_back_path(ledger_path):
    with Ledger(ledger_path) as ledger:
        ledger.claw_back("peer-a", since_epoch=1, reason=REASON, at=0.0)
    return ledger_path


def test_json_shows_clawed_back_amounts_beside_balances_and_each_clawback(clawed_back_path, capsys):
    args = parse("ledger", "--path", str(clawed_back_path), "--json")
    assert args.func(args) == 0
    snapshot = json.loads(capsys.readouterr().out)
    balances = {row["peer_id"]: row for row in snapshot["balances"]}
    a, b = balances["peer-a"], balances["peer-b"]
    assert (a["balance"], a["clawed_back"]) == (0.0, pytest.approx(75.0))
    assert (a["pending_work"], a["forfeited_work"]) == (0, 150)
    assert (b["balance"], b["clawed_back"], b["forfeited_work"]) == (pytest.approx(25.0), 0.0, 0)
    assert [(row["epoch"], row["kind"], row["reason"]) for row in snapshot["clawbacks"]] == [
        (2, "work", REASON), (1, "credit", REASON)
    ]


def test_tables_show_the_clawed_back_column_and_the_clawbacks(clawed_back_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per row, so the checks below see whole cells
    args = parse("ledger", "--path", str(clawed_back_path))
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "clawed back" in out and "forfeited work" in out and "Clawbacks" in out
    assert "75.0000" in out and REASON in out


def test_no_clawbacks_table_without_clawbacks(ledger_path, capsys):
    args = parse("ledger", "--path", str(ledger_path))
    assert args.func(args) == 0
    assert "Clawbacks" not in capsys.readouterr().out
