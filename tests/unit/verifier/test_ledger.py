"""The reward ledger: crediting, idempotence, and crash safety under a real SIGKILL (real SQLite)."""

import math
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from efedllm.verifier.ledger import Ledger, LedgerError, epoch_of

REWARD = 90.0


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as opened:
        yield opened


def test_credits_follow_scores_of_active_servers_with_work(ledger):
    ledger.record_work("a", tokens=100, blocks=30, epoch=3)
    ledger.record_work("a", tokens=20, blocks=30, epoch=3)
    ledger.record_work("b", tokens=100, blocks=10, epoch=3)
    ledger.record_work("c", tokens=100, blocks=10, epoch=3)
    scores = {"a": 1.0, "b": 0.5, "c": 1.0, "idle": 1.0}
    result = ledger.close_epoch(3, scores, active={"a", "b", "idle"}, reward=REWARD)
    assert result.credited_now
    amounts = {credit.peer_id: credit.amount for credit in result.credits}
    assert amounts == pytest.approx({"a": 60.0, "b": 30.0, "c": 0.0})  # c inactive, idle did no work
    assert {credit.peer_id: credit.work for credit in result.credits} == {"a": 3600, "b": 1000, "c": 1000}
    balances = {row.peer_id: row for row in ledger.balances()}
    assert balances["a"].balance == pytest.approx(60.0) and balances["a"].epochs == 1
    assert ledger.epochs()[0]["distributed"] == pytest.approx(REWARD)


def test_closing_an_epoch_twice_credits_once(ledger):
    ledger.record_work("a", 10, 5, epoch=1)
    first = ledger.close_epoch(1, {"a": 1.0}, {"a"}, REWARD)
    second = ledger.close_epoch(1, {"a": 1.0}, {"a"}, REWARD * 10)
    assert first.credited_now and not second.credited_now
    assert second.credits == first.credits
    assert [row.balance for row in ledger.balances()] == pytest.approx([REWARD])


def test_the_epochs_table_itself_refuses_a_second_credit(ledger):
    ledger.record_work("a", 10, 5, epoch=1)
    ledger.close_epoch(1, {"a": 1.0}, {"a"}, REWARD)
    with pytest.raises(sqlite3.IntegrityError):
        ledger.connection.execute("INSERT INTO epochs (epoch, closed_at, reward, distributed) VALUES (1, 0, 1, 1)")


def test_work_for_a_closed_epoch_is_refused_and_pending_work_is_shown(ledger):
    ledger.close_epoch(1, {}, set(), REWARD)
    with pytest.raises(LedgerError, match="already closed"):
        ledger.record_work("a", 10, 5, epoch=1)
    ledger.record_work("a", 10, 5, epoch=2)
    (row,) = ledger.balances()
    assert (row.balance, row.pending_work, row.credited_work) == (0.0, 50, 0)
    ledger.record_work("a", 10, 5, epoch=4)
    assert ledger.pending_epochs(before=4) == [2] and ledger.pending_epochs(before=5) == [2, 4]


@pytest.mark.parametrize(
    "arguments", [("", 1, 1, 0), ("a", 0, 1, 0), ("a", 1, 0, 0), ("a", 1, 1, -1), ("a", 1.5, 1, 0), ("a\n", 1, 1, 0)]
)
def test_bad_work_records_are_rejected(ledger, arguments):
    with pytest.raises(ValueError):
        ledger.record_work(*arguments)


def test_epoch_of_and_missing_or_foreign_files(tmp_path):
    assert epoch_of(7200.0, 3600.0) == 2 and epoch_of(7199.9, 3600.0) == 1
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger(tmp_path / "absent.sqlite").open(create=False)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="not a SQLite ledger"):
        Ledger(garbage).open()
    with pytest.raises(LedgerError, match="not open"):
        Ledger(tmp_path / "x.sqlite").balances()


def test_ledger_uses_wal_and_persists_across_reopen(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.record_work("a", 10, 5, epoch=1)
        assert ledger.connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Ledger(path) as ledger:
        assert ledger.epoch_work(1) == {"a": 50}


# A child process that records work, credits epoch 6 fully, then blocks inside the transaction
# that credits epoch 7, right before that transaction's second statement that writes a credit.
_KILLED_MID_CREDIT = textwrap.dedent(
    """
    import sys, time
    from efedllm.verifier.ledger import Ledger

    credit_statements = 0

    def trace(statement):
        global credit_statements
        if statement.startswith("INSERT INTO credits"):
            credit_statements += 1
            if closing_epoch_7 and credit_statements == 2:
                print("MID-CREDIT", flush=True)
                time.sleep(120)

    closing_epoch_7 = False
    ledger = Ledger(sys.argv[1], trace=trace).open()
    for epoch in (6, 7):
        for peer in ("a", "b", "c"):
            ledger.record_work(peer, tokens=100, blocks=10, epoch=epoch)
    ledger.close_epoch(6, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a", "b", "c"}, 90.0)
    print("EPOCH-6-CREDITED", flush=True)
    credit_statements, closing_epoch_7 = 0, True
    ledger.close_epoch(7, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a", "b", "c"}, 90.0)
    print("EPOCH-7-CREDITED", flush=True)
    """
)


def _start_child(script, *arguments):
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, arguments)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _kill(child):
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL


def _check_invariants(ledger):
    """Every closed epoch is credited exactly once in full; balances are the sums of credits."""
    for row in ledger.epochs(limit=10_000):
        credited = [credit for credit in row["credits"] if credit["amount"] > 0]
        assert math.fsum(credit["amount"] for credit in credited) == pytest.approx(row["distributed"])
        assert len({credit["peer_id"] for credit in row["credits"]}) == len(row["credits"])
    total = math.fsum(balance.balance for balance in ledger.balances())
    assert total == pytest.approx(math.fsum(row["distributed"] for row in ledger.epochs(limit=10_000)))


@pytest.mark.timeout(120)
def test_sigkill_in_the_middle_of_crediting_loses_nothing_and_never_credits_twice(tmp_path):
    path = tmp_path / "ledger.sqlite"
    child = _start_child(_KILLED_MID_CREDIT, path)
    lines = []
    while not lines or lines[-1] != "MID-CREDIT":
        line = child.stdout.readline()
        assert line, f"child ended early: {lines} {child.stderr.read()}"
        lines.append(line.strip())
    assert lines == ["EPOCH-6-CREDITED", "MID-CREDIT"]
    _kill(child)

    with Ledger(path) as ledger:
        assert ledger.is_closed(6) and not ledger.is_closed(7)  # epoch 7's partial credit rolled back
        assert [c.amount for c in ledger.credits(6)] == pytest.approx([30.0, 30.0, 30.0])
        assert ledger.credits(7) == ()
        assert ledger.epoch_work(7) == {"a": 1000, "b": 1000, "c": 1000}  # committed work survived
        _check_invariants(ledger)
        retried = ledger.close_epoch(7, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a", "b", "c"}, 90.0)
        again = ledger.close_epoch(7, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a", "b", "c"}, 90.0)
        assert retried.credited_now and not again.credited_now
        assert {b.peer_id: b.balance for b in ledger.balances()} == pytest.approx({"a": 60.0, "b": 60.0, "c": 60.0})
        _check_invariants(ledger)


# A child that keeps recording work and closing epochs as fast as it can, resuming where a killed
# predecessor stopped: it closes any epoch with work left open, then starts the next one.
_WORKER = textwrap.dedent(
    """
    import sys
    from efedllm.verifier.ledger import Ledger

    ledger = Ledger(sys.argv[1]).open()
    epoch = 0
    while True:
        if not ledger.is_closed(epoch):
            recorded = ledger.epoch_work(epoch)
            for peer in ("a", "b"):
                if peer not in recorded:
                    ledger.record_work(peer, tokens=epoch + 1, blocks=2, epoch=epoch)
            ledger.close_epoch(epoch, {"a": 1.0, "b": 3.0}, {"a", "b"}, 4.0)
            print(epoch, flush=True)
        epoch += 1
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("lines_before_kill", [3, 17, 41])
def test_repeated_sigkills_of_a_busy_ledger_keep_every_epoch_credited_once(tmp_path, lines_before_kill):
    path = tmp_path / "ledger.sqlite"
    for _ in range(3):  # kill, restart (the worker resumes), kill again
        child = _start_child(_WORKER, path)
        for _ in range(lines_before_kill):
            assert child.stdout.readline(), child.stderr.read()
        _kill(child)
    with Ledger(path) as ledger:
        _check_invariants(ledger)
        closed = [row["epoch"] for row in ledger.epochs(limit=10_000)]
        assert sorted(closed) == list(range(len(closed)))  # no epoch skipped
        for epoch in closed:
            assert {c.peer_id: c.amount for c in ledger.credits(epoch)} == pytest.approx({"a": 1.0, "b": 3.0})
        # Work of an epoch left open by the last kill is still there and can be credited once.
        open_epoch = len(closed)
        if ledger.epoch_work(open_epoch):
            assert ledger.close_epoch(open_epoch, {"a": 1.0, "b": 3.0}, {"a", "b"}, 4.0).credited_now
            assert not ledger.close_epoch(open_epoch, {"a": 1.0, "b": 3.0}, {"a", "b"}, 4.0).credited_now
        _check_invariants(ledger)
