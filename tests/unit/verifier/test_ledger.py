"""The reward ledger: crediting, clawbacks, idempotence, schema upgrades, crash safety under a real SIGKILL."""

import math
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from efedllm.verifier import ledger as ledger_module
from efedllm.verifier.ledger import (
    MAX_REASON_LENGTH,
    SCHEMA_VERSION,
    Balance,
    Clawback,
    Ledger,
    LedgerError,
    epoch_of,
)

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


# --- clawbacks -------------------------------------------------------------------------------

LIED = "signed proof: wrong hidden states at probe 7"


def _work_and_close(ledger, epoch, peers, scores=None, active=None, reward=REWARD):
    for peer in peers:
        ledger.record_work(peer, tokens=100, blocks=10, epoch=epoch)
    scores = {peer: 1.0 for peer in peers} if scores is None else scores
    return ledger.close_epoch(epoch, scores, set(peers) if active is None else active, reward)


def test_clawback_forfeits_open_work_so_closing_pays_the_peer_nothing_and_the_others_as_before(ledger, tmp_path):
    for peer in ("a", "b", "cheat"):
        ledger.record_work(peer, tokens=100, blocks=10, epoch=5)
    ledger.record_work("cheat", tokens=5, blocks=2, epoch=5)
    clawback = ledger.claw_back("cheat", since_epoch=5, reason=LIED, at=123.0)
    assert (clawback.peer_id, clawback.epochs) == ("cheat", (5,))
    assert (clawback.unpaid_work_forfeited, clawback.credit_clawed_back) == (1010, 0.0)
    assert ledger.epoch_work(5) == {"a": 1000, "b": 1000}
    (record,) = ledger.clawbacks()
    assert (record.peer_id, record.epoch, record.kind, record.amount, record.work) == ("cheat", 5, "work", 0.0, 1010)
    assert (record.reason, record.clawed_at) == (LIED, 123.0)

    closed = ledger.close_epoch(5, {"a": 1.0, "b": 1.0, "cheat": 1.0}, {"a", "b", "cheat"}, REWARD)
    with Ledger(tmp_path / "without-the-cheat.sqlite") as honest:  # the same epoch had the cheat never worked
        expected = _work_and_close(honest, 5, ("a", "b"))
    assert closed.credits == expected.credits
    balances = {row.peer_id: row for row in ledger.balances()}
    assert balances["cheat"] == Balance("cheat", 0.0, 0, 0, 0, clawed_back=0.0, forfeited_work=1010)
    assert balances["a"].balance == pytest.approx(45.0) and balances["a"].clawed_back == 0.0


def test_clawback_takes_closed_credits_since_an_epoch_and_keeps_older_ones(ledger):
    _work_and_close(ledger, 1, ("a", "b"))
    _work_and_close(ledger, 2, ("a", "b"))
    _work_and_close(ledger, 3, ("a", "b"))
    _work_and_close(ledger, 4, ("a", "b"), active={"b"})  # a inactive: a zero credit, nothing to claw back
    ledger.record_work("a", tokens=7, blocks=3, epoch=1_000)  # pending in an open epoch
    credits_before = ledger.credits()

    clawback = ledger.claw_back("a", since_epoch=2, reason=LIED)
    assert clawback.epochs == (2, 3, 1_000)
    assert clawback.credit_clawed_back == pytest.approx(90.0) and clawback.unpaid_work_forfeited == 21
    assert ledger.credits() == credits_before  # credit rows stay, as history
    assert [(r.epoch, r.kind, r.amount, r.work) for r in ledger.clawbacks("a")] == [
        (1_000, "work", 0.0, 21),
        (2, "credit", pytest.approx(45.0), 1000),
        (3, "credit", pytest.approx(45.0), 1000),
    ]
    assert ledger.clawbacks("b") == ()
    balances = {row.peer_id: row for row in ledger.balances()}
    a, b = balances["a"], balances["b"]
    assert (a.balance, a.clawed_back) == (pytest.approx(45.0), pytest.approx(90.0))  # epoch 1 kept
    assert (a.credited_work, a.pending_work, a.forfeited_work, a.epochs) == (4000, 0, 21, 4)
    assert (b.balance, b.clawed_back, b.forfeited_work) == (pytest.approx(3 * 45.0 + 90.0), 0.0, 0)


def test_since_epoch_also_bounds_the_open_work_forfeited(ledger):
    ledger.record_work("a", 10, 5, epoch=1)  # open, but older than the lie: the caller keeps it
    ledger.record_work("a", 10, 5, epoch=2)
    assert ledger.claw_back("a", since_epoch=2, reason=LIED).epochs == (2,)
    assert ledger.epoch_work(1) == {"a": 50} and ledger.epoch_work(2) == {}
    assert ledger.pending_epochs(before=10) == [1]


def test_clawing_back_twice_never_takes_a_credit_twice_and_forfeits_new_work_beside_the_old(ledger):
    _work_and_close(ledger, 1, ("a", "b"))
    ledger.record_work("a", 10, 5, epoch=2)
    first = ledger.claw_back("a", since_epoch=0, reason=LIED)
    assert first.epochs == (1, 2) and first.unpaid_work_forfeited == 50
    assert ledger.claw_back("a", since_epoch=0, reason="again") == Clawback("a", (), 0, 0.0)

    ledger.record_work("a", 3, 5, epoch=2)  # more work after the clawback, in the same open epoch
    again = ledger.claw_back("a", since_epoch=0, reason="again")
    assert again == Clawback("a", (2,), 15, 0.0)
    assert [(r.epoch, r.kind, r.work) for r in ledger.clawbacks("a")] == [
        (2, "work", 50), (1, "credit", 1000), (2, "work", 15)
    ]
    (a, _) = ledger.balances()
    assert (a.balance, a.clawed_back, a.forfeited_work) == (0.0, pytest.approx(45.0), 65)
    # Even a write that skipped the check would be refused by the schema itself.
    with pytest.raises(sqlite3.IntegrityError):
        ledger.connection.execute(
            "INSERT INTO clawbacks (peer_id, epoch, kind, amount, work, reason, clawed_at) "
            "VALUES ('a', 1, 'credit', 1.0, 0, 'x', 0)"
        )


def test_a_fully_clawed_back_balance_is_exactly_zero(ledger):
    for epoch in range(1, 31):  # thirds that do not sum back exactly in every order
        _work_and_close(ledger, epoch, ("a", "b"), scores={"a": 1.0, "b": 2.0}, reward=0.1 * epoch)
    ledger.claw_back("a", since_epoch=0, reason=LIED)
    a, b = ledger.balances()
    assert a.balance == 0.0 and a.clawed_back == pytest.approx(math.fsum(0.1 * e / 3 for e in range(1, 31)))
    total = math.fsum(row.balance for row in ledger.balances())
    distributed = math.fsum(row["distributed"] for row in ledger.epochs(limit=100))
    assert total == pytest.approx(distributed - a.clawed_back) and b.clawed_back == 0.0


@pytest.mark.parametrize(
    "arguments, named",
    [
        (("", 0, LIED), "peer_id"),
        (("a\n", 0, LIED), "peer_id"),
        ((7, 0, LIED), "peer_id"),
        (("a", -1, LIED), "since_epoch"),
        (("a", 1.0, LIED), "since_epoch"),
        (("a", True, LIED), "since_epoch"),
        (("a", 0, ""), "reason"),
        (("a", 0, "   "), "reason"),
        (("a", 0, "x" * 501), "reason"),
        (("a", 0, None), "reason"),
        (("a", 0, b"bytes"), "reason"),
        (("a", 0, LIED, -1.0), "at"),
        (("a", 0, LIED, float("nan")), "at"),
        (("a", 0, LIED, True), "at"),
        (("a", 0, LIED, "now"), "at"),
    ],
)
def test_bad_clawbacks_are_rejected_naming_the_argument_and_change_nothing(ledger, arguments, named):
    ledger.record_work("a", 10, 5, epoch=1)
    with pytest.raises(ValueError, match=f"^{named} "):
        ledger.claw_back(*arguments)
    assert ledger.epoch_work(1) == {"a": 50} and ledger.clawbacks() == ()


def test_a_reason_of_the_maximum_length_is_kept_whole_and_a_closed_ledger_is_refused(ledger, tmp_path):
    assert ledger.claw_back("a", 0, "x" * MAX_REASON_LENGTH) == Clawback("a", (), 0, 0.0)
    with pytest.raises(LedgerError, match="not open"):
        Ledger(tmp_path / "x.sqlite").claw_back("a", 0, LIED)


def test_an_exception_inside_the_clawback_transaction_leaves_nothing_done(ledger, monkeypatch):
    _work_and_close(ledger, 1, ("a", "b"))
    ledger.record_work("a", 10, 5, epoch=2)

    def fail(*_):
        raise RuntimeError("injected after the work was forfeited")

    monkeypatch.setattr(Ledger, "_claw_back_credits", fail)
    with pytest.raises(RuntimeError, match="injected"):
        ledger.claw_back("a", since_epoch=0, reason=LIED)
    assert ledger.epoch_work(2) == {"a": 50} and ledger.clawbacks() == ()
    assert not ledger.connection.in_transaction
    monkeypatch.undo()
    assert ledger.claw_back("a", since_epoch=0, reason=LIED).epochs == (1, 2)


# A child that credits epochs 1 and 2, records work into epoch 3, then blocks inside the clawback
# of a's earnings, right before its second write to the clawbacks table.
_KILLED_MID_CLAWBACK = textwrap.dedent(
    """
    import sys, time
    from efedllm.verifier.ledger import Ledger

    clawing, writes = False, 0

    def trace(statement):
        global writes
        if clawing and statement.startswith("INSERT INTO clawbacks"):
            writes += 1
            if writes == 2:
                print("MID-CLAWBACK", flush=True)
                time.sleep(120)

    ledger = Ledger(sys.argv[1], trace=trace).open()
    for epoch in (1, 2, 3):
        for peer in ("a", "b"):
            ledger.record_work(peer, tokens=100, blocks=10, epoch=epoch)
        if epoch < 3:
            ledger.close_epoch(epoch, {"a": 1.0, "b": 1.0}, {"a", "b"}, 90.0)
    print("READY", flush=True)
    clawing = True
    ledger.claw_back("a", since_epoch=1, reason="lied")
    print("CLAWED-BACK", flush=True)
    """
)


@pytest.mark.timeout(120)
def test_sigkill_in_the_middle_of_a_clawback_leaves_all_or_nothing(tmp_path):
    path = tmp_path / "ledger.sqlite"
    child = _start_child(_KILLED_MID_CLAWBACK, path)
    lines = []
    while not lines or lines[-1] != "MID-CLAWBACK":
        line = child.stdout.readline()
        assert line, f"child ended early: {lines} {child.stderr.read()}"
        lines.append(line.strip())
    assert lines == ["READY", "MID-CLAWBACK"]
    _kill(child)

    with Ledger(path) as ledger:
        assert ledger.clawbacks() == ()  # the forfeiture already written rolled back with the rest
        assert ledger.epoch_work(3) == {"a": 1000, "b": 1000}
        assert [(b.peer_id, b.balance, b.clawed_back) for b in ledger.balances()] == [
            ("a", pytest.approx(90.0), 0.0), ("b", pytest.approx(90.0), 0.0)
        ]
        _check_invariants(ledger)
        assert ledger.claw_back("a", since_epoch=1, reason="lied") == Clawback("a", (1, 2, 3), 1000, 90.0)
        assert [b.balance for b in ledger.balances()] == pytest.approx([0.0, 90.0])


# --- schema versions -------------------------------------------------------------------------

# The schema as efedllm wrote it at version 1, verbatim: old files look like this forever.
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS work (
    id INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL CHECK (epoch >= 0),
    peer_id TEXT NOT NULL,
    tokens INTEGER NOT NULL CHECK (tokens > 0),
    blocks INTEGER NOT NULL CHECK (blocks > 0),
    recorded_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS work_by_epoch ON work (epoch, peer_id);
CREATE TABLE IF NOT EXISTS epochs (
    epoch INTEGER PRIMARY KEY NOT NULL CHECK (epoch >= 0),
    closed_at REAL NOT NULL,
    reward REAL NOT NULL CHECK (reward >= 0),
    distributed REAL NOT NULL CHECK (distributed >= 0)
);
CREATE TABLE IF NOT EXISTS credits (
    epoch INTEGER NOT NULL REFERENCES epochs (epoch),
    peer_id TEXT NOT NULL,
    work INTEGER NOT NULL,
    score REAL NOT NULL,
    active INTEGER NOT NULL,
    amount REAL NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (epoch, peer_id)
);
"""


def _write_v1_ledger(path):
    """A ledger file as the version-1 code left it: WAL, its schema, one closed epoch and pending work."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.executescript(f"BEGIN IMMEDIATE; {_SCHEMA_V1} PRAGMA user_version=1; COMMIT;")
    connection.executescript(
        """
        BEGIN IMMEDIATE;
        INSERT INTO work (epoch, peer_id, tokens, blocks, recorded_at) VALUES (1, 'a', 100, 30, 10.0);
        INSERT INTO work (epoch, peer_id, tokens, blocks, recorded_at) VALUES (1, 'b', 100, 10, 11.0);
        INSERT INTO epochs (epoch, closed_at, reward, distributed) VALUES (1, 20.0, 90.0, 90.0);
        INSERT INTO credits VALUES (1, 'a', 3000, 1.0, 1, 67.5);
        INSERT INTO credits VALUES (1, 'b', 1000, 1.0, 1, 22.5);
        INSERT INTO work (epoch, peer_id, tokens, blocks, recorded_at) VALUES (2, 'a', 10, 5, 30.0);
        COMMIT;
        """
    )
    connection.close()


def _user_version(path):
    connection = sqlite3.connect(path)
    try:
        return connection.execute("PRAGMA user_version").fetchone()[0]
    finally:
        connection.close()


def test_a_version_1_ledger_is_upgraded_in_place_losing_nothing(tmp_path):
    path = tmp_path / "v1.sqlite"
    _write_v1_ledger(path)
    assert _user_version(path) == 1
    with Ledger(path).open(create=False) as ledger:
        assert ledger.connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert ledger.clawbacks() == ()
        assert [(c.epoch, c.peer_id, c.work, c.amount) for c in ledger.credits()] == [
            (1, "a", 3000, 67.5), (1, "b", 1000, 22.5)
        ]
        assert ledger.epoch_work(1) == {"a": 3000, "b": 1000} and ledger.epoch_work(2) == {"a": 50}
        assert ledger.epochs()[0]["distributed"] == 90.0 and ledger.epochs()[0]["closed_at"] == 20.0
        assert [(b.peer_id, b.balance, b.pending_work) for b in ledger.balances()] == [("a", 67.5, 50), ("b", 22.5, 0)]
        assert ledger.claw_back("a", since_epoch=1, reason=LIED) == Clawback("a", (1, 2), 50, 67.5)
    with Ledger(path) as reopened:  # already current: opening again changes nothing
        assert [(b.peer_id, b.balance) for b in reopened.balances()] == [("a", 0.0), ("b", 22.5)]
        assert len(reopened.clawbacks()) == 2
    assert _user_version(path) == 2


def test_a_failed_upgrade_leaves_the_version_1_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "v1.sqlite"
    _write_v1_ledger(path)
    broken = {**ledger_module._SCHEMA_STEPS, 2: ledger_module._SCHEMA_STEPS[2] + "; THIS IS NOT SQL"}
    monkeypatch.setattr(ledger_module, "_SCHEMA_STEPS", broken)
    with pytest.raises(sqlite3.OperationalError):
        Ledger(path).open()
    connection = sqlite3.connect(path)
    tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    connection.close()
    assert tables == {"work", "epochs", "credits"} and _user_version(path) == 1  # the new table rolled back too
    monkeypatch.undo()
    with Ledger(path) as ledger:
        assert [b.balance for b in ledger.balances()] == [67.5, 22.5]


def test_a_version_written_back_by_older_code_upgrades_again_harmlessly(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        _work_and_close(ledger, 1, ("a",))
        ledger.claw_back("a", 0, LIED)
        ledger.connection.execute("PRAGMA user_version=1")  # what a racing version-1 process would write
    with Ledger(path) as ledger:
        assert len(ledger.clawbacks()) == 1 and [b.balance for b in ledger.balances()] == [0.0]
    assert _user_version(path) == 2


def test_a_newer_schema_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "newer.sqlite"
    with Ledger(path) as ledger:
        ledger.connection.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerError, match=f"schema {SCHEMA_VERSION + 1}; this version reads up to {SCHEMA_VERSION}"):
        Ledger(path).open()
    assert _user_version(path) == SCHEMA_VERSION + 1
