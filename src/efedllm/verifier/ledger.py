"""The incentive ledger: verified work per server and rewards credited per epoch, in SQLite (WAL).

Work is recorded as ``tokens x blocks`` per server and epoch. Closing an epoch credits that
epoch's reward to the servers that did verified work in it, are active, and have a positive
paper eq. (3) score, in proportion to that score (:func:`~efedllm.verifier.trust.reward_shares`);
servers that did work but were inactive get a zero-amount row, so the history says why.

Crash safety comes from SQLite, not from care in this module:

- every write is one ``BEGIN IMMEDIATE ... COMMIT`` transaction in WAL mode with
  ``synchronous=FULL``, so a process killed at any point leaves either all of an epoch's credits
  or none of them, and a committed work record or credit survives the kill (and a power loss);
- ``epochs.epoch`` is the table's primary key (unique): the row is inserted in the same
  transaction as the credits, so an epoch is credited at most once, and closing it again is a
  no-op that returns the credits already committed;
- balances are sums over ``credits`` rather than a counter updated beside them, so there is no
  second copy that could disagree.

Work cannot be recorded into an epoch that is already closed (it would never be paid).

A *clawback* (:meth:`Ledger.claw_back`) takes back what a server earned once a verifier holds
signed proof that it lied. How far back is the caller's choice, ``since_epoch``: from that epoch
on, the server's unpaid work in epochs not closed yet is forfeited (deleted from ``work``, so
closing those epochs pays it nothing and pays the others as if it had done none), and each of its
positive credits in closed epochs is clawed back. Both land in the ``clawbacks`` table, in one
transaction; the ``credits`` rows stay as history, and every balance is credits minus clawbacks,
again computed as sums. A credit is clawed back at most once (a unique index on
``(peer_id, epoch)`` for credit clawbacks), so repeating a clawback takes nothing twice; work
recorded into an open epoch after a clawback is forfeited by the next one, beside the first.

The schema's version is SQLite's ``user_version``. Opening an older file upgrades it in place, in
one transaction (version 1 lacked ``clawbacks``); a file from a newer efedllm is refused.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Callable, Iterator, Mapping

from efedllm.common.errors import EfedllmError
from efedllm.verifier.trust import reward_shares

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

# Version 2 adds clawbacks and deactivations (peers proven to lie, deactivated for good). kind 'work': unpaid work of an open epoch was forfeited (amount 0,
# work = the tokens x blocks deleted); kind 'credit': a closed epoch's credit was taken back
# (amount = that credit's amount, work = the work it had paid for).
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS clawbacks (
    id INTEGER PRIMARY KEY,
    peer_id TEXT NOT NULL,
    epoch INTEGER NOT NULL CHECK (epoch >= 0),
    kind TEXT NOT NULL CHECK (kind IN ('work', 'credit')),
    amount REAL NOT NULL CHECK ((kind = 'work' AND amount = 0) OR (kind = 'credit' AND amount > 0)),
    work INTEGER NOT NULL CHECK (work >= 0),
    reason TEXT NOT NULL,
    clawed_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS clawbacks_one_per_credit ON clawbacks (peer_id, epoch) WHERE kind = 'credit';
CREATE INDEX IF NOT EXISTS clawbacks_by_peer ON clawbacks (peer_id, epoch);
CREATE TABLE IF NOT EXISTS deactivations (
    peer_id TEXT PRIMARY KEY NOT NULL,
    reason TEXT NOT NULL,
    deactivated_at REAL NOT NULL
);
"""

SCHEMA_VERSION = 2

# What each version adds to the one before it: a file at version v gets the steps above v. Every
# step is idempotent (IF NOT EXISTS) because an older efedllm opening the file at the same moment
# may write its own, lower, user_version back; the next open then runs the step again, harmlessly.
_SCHEMA_STEPS = {1: _SCHEMA_V1, 2: _SCHEMA_V2}
MAX_REASON_LENGTH = 500


class LedgerError(EfedllmError, RuntimeError):
    """The ledger cannot do what was asked (closed epoch, missing file, newer schema)."""


@dataclass(frozen=True)
class Credit:
    epoch: int
    peer_id: str
    work: int
    score: float
    active: bool
    amount: float


@dataclass(frozen=True)
class EpochClose:
    """The outcome of closing an epoch; ``credited_now`` is False when it had been closed before."""

    epoch: int
    credited_now: bool
    credits: tuple[Credit, ...]


@dataclass(frozen=True)
class Balance:
    """A server's standing: ``balance`` is its credits minus ``clawed_back``; work is tokens x blocks."""

    peer_id: str
    balance: float
    credited_work: int
    pending_work: int
    epochs: int
    clawed_back: float = 0.0
    forfeited_work: int = 0


@dataclass(frozen=True)
class Clawback:
    """The outcome of one :meth:`Ledger.claw_back`: what it took now (zeros when it had all been taken before)."""

    peer_id: str
    epochs: tuple[int, ...]
    unpaid_work_forfeited: int
    credit_clawed_back: float


@dataclass(frozen=True)
class ClawbackRecord:
    """One row of the ``clawbacks`` table: ``kind`` is ``"work"`` (forfeited, amount 0) or ``"credit"``."""

    peer_id: str
    epoch: int
    kind: str
    amount: float
    work: int
    reason: str
    clawed_at: float


def default_ledger_path() -> Path:
    """``~/.local/share/efedllm/ledger.sqlite``: the ledger outlives caches, so it is not under ``~/.cache``."""
    return Path.home() / ".local" / "share" / "efedllm" / "ledger.sqlite"


def epoch_of(timestamp: float, epoch_seconds: float) -> int:
    """The epoch a moment belongs to: epochs are consecutive ``epoch_seconds`` windows from the Unix epoch."""
    if not (math.isfinite(timestamp) and timestamp >= 0 and epoch_seconds > 0):
        raise ValueError(f"need a timestamp >= 0 and epoch_seconds > 0, got {timestamp}, {epoch_seconds}")
    return int(timestamp // epoch_seconds)


def _check_peer_id(peer_id: object) -> str:
    if not (isinstance(peer_id, str) and 0 < len(peer_id) <= 128 and peer_id.isprintable()):
        raise ValueError(f"peer_id must be a printable string of 1..128 characters, got {peer_id!r}")
    return peer_id


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_reason(reason: object) -> str:
    # The reason is the audit trail of a clawback: it must say something, and stay short enough
    # to print (the signed proof itself belongs elsewhere; the reason can point at it).
    if not (isinstance(reason, str) and reason.strip() and len(reason) <= MAX_REASON_LENGTH):
        limit = MAX_REASON_LENGTH
        raise ValueError(f"reason must be a non-blank string of at most {limit} characters, got {reason!r:.80}")
    return reason


def _check_time(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite timestamp >= 0, got {value!r}")
    return float(value)


class Ledger:
    """A SQLite ledger file. Construct, then ``open()`` (or use ``with``); ``close()`` when done.

    ``trace``, when given, is called with each SQL statement before it runs (diagnostics; the
    crash-safety test uses it to be killed in the middle of a transaction).
    """

    def __init__(self, path: str | Path, trace: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self._trace = trace
        self._connection: sqlite3.Connection | None = None

    def open(self, create: bool = True) -> "Ledger":
        if self._connection is not None:
            return self
        if not create and not self.path.is_file():
            raise LedgerError(f"no ledger at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            self._configure(connection)
        except Exception:
            connection.close()
            raise
        self._connection = connection
        return self

    def _configure(self, connection: sqlite3.Connection) -> None:
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"{self.path} is not a SQLite ledger: {error}") from None
        self._refuse_newer(version)
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise LedgerError(f"{self.path}: could not switch to WAL journaling (got {mode!r})")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA foreign_keys=ON")
        if version < SCHEMA_VERSION:
            self._upgrade(connection)
        if self._trace is not None:
            connection.set_trace_callback(self._trace)

    def _refuse_newer(self, version: int) -> None:
        # A newer efedllm's tables may mean things this one does not know; writing to them could corrupt them.
        if version > SCHEMA_VERSION:
            raise LedgerError(f"{self.path} has ledger schema {version}; this version reads up to {SCHEMA_VERSION}")

    def _upgrade(self, connection: sqlite3.Connection) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION` in one transaction: all steps and the new version, or none."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have upgraded the file meanwhile.
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            self._refuse_newer(version)
            for step in range(version + 1, SCHEMA_VERSION + 1):
                # One execute() per statement: executescript() would commit the open transaction first.
                for statement in filter(str.strip, _SCHEMA_STEPS[step].split(";")):
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> "Ledger":
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise LedgerError("the ledger is not open; call open() first")
        return self._connection

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        connection = self.connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def record_work(self, peer_id: str, tokens: int, blocks: int, epoch: int, timestamp: float | None = None) -> None:
        """Record ``tokens`` verified tokens through ``blocks`` blocks by ``peer_id`` in ``epoch``."""
        _check_peer_id(peer_id)
        _check_count("tokens", tokens, 1)
        _check_count("blocks", blocks, 1)
        _check_count("epoch", epoch, 0)
        with self._transaction() as connection:
            if connection.execute("SELECT 1 FROM epochs WHERE epoch = ?", (epoch,)).fetchone():
                raise LedgerError(f"epoch {epoch} is already closed; work for it can no longer be credited")
            connection.execute(
                "INSERT INTO work (epoch, peer_id, tokens, blocks, recorded_at) VALUES (?, ?, ?, ?, ?)",
                (epoch, peer_id, tokens, blocks, time.time() if timestamp is None else timestamp),
            )

    def epoch_work(self, epoch: int) -> dict[str, int]:
        """``peer_id -> tokens x blocks`` recorded in ``epoch``."""
        rows = self.connection.execute(
            "SELECT peer_id, SUM(tokens * blocks) FROM work WHERE epoch = ? GROUP BY peer_id ORDER BY peer_id", (epoch,)
        )
        return {peer_id: int(work) for peer_id, work in rows}

    def close_epoch(
        self,
        epoch: int,
        scores: Mapping[str, float],
        active: AbstractSet[str],
        reward: float,
        now: float | None = None,
    ) -> EpochClose:
        """Credit ``reward`` for ``epoch`` once; a repeated call changes nothing and returns the committed credits."""
        _check_count("epoch", epoch, 0)
        if not (math.isfinite(reward) and reward >= 0):
            raise ValueError(f"reward must be a finite number >= 0, got {reward}")
        with self._transaction() as connection:
            if connection.execute("SELECT 1 FROM epochs WHERE epoch = ?", (epoch,)).fetchone():
                credited_now = False
            else:
                self._credit(connection, epoch, scores, active, reward, time.time() if now is None else now)
                credited_now = True
        return EpochClose(epoch, credited_now, self.credits(epoch))

    def _credit(self, connection, epoch, scores, active, reward, now) -> None:
        work = self.epoch_work(epoch)
        eligible = {peer: float(scores.get(peer, 0.0)) for peer in work if peer in active}
        shares = reward_shares(eligible, reward)
        # The epoch row goes first: its primary key makes a concurrent second close fail here.
        connection.execute(
            "INSERT INTO epochs (epoch, closed_at, reward, distributed) VALUES (?, ?, ?, ?)",
            (epoch, now, reward, math.fsum(shares.values())),
        )
        for peer, peer_work in work.items():
            connection.execute(
                "INSERT INTO credits (epoch, peer_id, work, score, active, amount) VALUES (?, ?, ?, ?, ?, ?)",
                (epoch, peer, peer_work, float(scores.get(peer, 0.0)), int(peer in active), shares.get(peer, 0.0)),
            )

    def pending_epochs(self, before: int) -> list[int]:
        """Epochs below ``before`` that hold work and are not credited yet, oldest first."""
        rows = self.connection.execute(
            "SELECT DISTINCT epoch FROM work WHERE epoch < ? AND epoch NOT IN (SELECT epoch FROM epochs) ORDER BY epoch",
            (before,),
        )
        return [epoch for (epoch,) in rows]

    def is_closed(self, epoch: int) -> bool:
        return self.connection.execute("SELECT 1 FROM epochs WHERE epoch = ?", (epoch,)).fetchone() is not None

    def credits(self, epoch: int | None = None) -> tuple[Credit, ...]:
        query = "SELECT epoch, peer_id, work, score, active, amount FROM credits"
        rows = self.connection.execute(
            query + (" WHERE epoch = ?" if epoch is not None else "") + " ORDER BY epoch, peer_id",
            (epoch,) if epoch is not None else (),
        )
        return tuple(Credit(e, p, int(w), float(s), bool(a), float(m)) for e, p, w, s, a, m in rows)

    def claw_back(self, peer_id: str, since_epoch: int, reason: str, at: float | None = None) -> Clawback:
        """Take back what ``peer_id`` earned from ``since_epoch`` on, in one transaction, for ``reason``.

        Its work in epochs >= ``since_epoch`` not closed yet is forfeited (deleted, so closing them
        pays it nothing); its credits with amount > 0 in closed epochs >= ``since_epoch`` are clawed
        back. ``at`` (default now) dates the clawback rows. A credit already clawed back is skipped,
        so calling this again takes only what was earned since.
        """
        _check_peer_id(peer_id)
        _check_count("since_epoch", since_epoch, 0)
        _check_reason(reason)
        at = time.time() if at is None else _check_time("at", at)
        with self._transaction() as connection:
            forfeited = self._forfeit_open_work(connection, peer_id, since_epoch, reason, at)
            clawed = self._claw_back_credits(connection, peer_id, since_epoch, reason, at)
        epochs = tuple(sorted(forfeited.keys() | clawed.keys()))
        return Clawback(peer_id, epochs, sum(forfeited.values()), math.fsum(clawed.values()))

    def _forfeit_open_work(self, connection, peer_id, since_epoch, reason, at) -> dict[int, int]:
        """Delete the peer's work of open epochs >= ``since_epoch``; ``epoch -> work`` deleted."""
        # Closed epochs keep their work rows: they are the history behind their credits.
        where = "peer_id = ? AND epoch >= ? AND epoch NOT IN (SELECT epoch FROM epochs)"
        forfeited = {
            epoch: int(work)
            for epoch, work in connection.execute(
                f"SELECT epoch, SUM(tokens * blocks) FROM work WHERE {where} GROUP BY epoch ORDER BY epoch",
                (peer_id, since_epoch),
            )
        }
        connection.execute(f"DELETE FROM work WHERE {where}", (peer_id, since_epoch))
        for epoch, work in forfeited.items():
            connection.execute(
                "INSERT INTO clawbacks (peer_id, epoch, kind, amount, work, reason, clawed_at) "
                "VALUES (?, ?, 'work', 0, ?, ?, ?)",
                (peer_id, epoch, work, reason, at),
            )
        return forfeited

    def _claw_back_credits(self, connection, peer_id, since_epoch, reason, at) -> dict[int, float]:
        """Claw back the peer's positive credits of closed epochs >= ``since_epoch`` not clawed back yet."""
        rows = connection.execute(
            "SELECT epoch, amount, work FROM credits WHERE peer_id = ? AND epoch >= ? AND amount > 0 "
            "AND NOT EXISTS (SELECT 1 FROM clawbacks AS c "
            "WHERE c.kind = 'credit' AND c.peer_id = credits.peer_id AND c.epoch = credits.epoch) ORDER BY epoch",
            (peer_id, since_epoch),
        ).fetchall()
        for epoch, amount, work in rows:
            # The unique index on credit clawbacks would refuse a second row even if this query did not skip it.
            connection.execute(
                "INSERT INTO clawbacks (peer_id, epoch, kind, amount, work, reason, clawed_at) "
                "VALUES (?, ?, 'credit', ?, ?, ?, ?)",
                (peer_id, epoch, amount, work, reason, at),
            )
        return {epoch: float(amount) for epoch, amount, _ in rows}

    def record_deactivation(self, peer_id: str, reason: str, at: float | None = None) -> None:
        """Remembers for good that ``peer_id`` was deactivated for ``reason`` (a proven lie); the first reason stays."""
        _check_peer_id(peer_id)
        _check_reason(reason)
        at = time.time() if at is None else _check_time("at", at)
        with self._transaction() as connection:
            connection.execute("INSERT OR IGNORE INTO deactivations (peer_id, reason, deactivated_at) VALUES (?, ?, ?)",
                               (peer_id, reason, at))

    def deactivations(self) -> dict[str, str]:
        """Every peer deactivated for good: peer id -> reason."""
        return dict(self.connection.execute("SELECT peer_id, reason FROM deactivations ORDER BY deactivated_at"))

    def clawbacks(self, peer_id: str | None = None) -> tuple[ClawbackRecord, ...]:
        """Every clawback row (of ``peer_id`` only, when given), oldest first."""
        query = "SELECT peer_id, epoch, kind, amount, work, reason, clawed_at FROM clawbacks"
        rows = self.connection.execute(
            query + (" WHERE peer_id = ?" if peer_id is not None else "") + " ORDER BY id",
            (peer_id,) if peer_id is not None else (),
        )
        return tuple(ClawbackRecord(p, e, k, float(m), int(w), r, float(t)) for p, e, k, m, w, r, t in rows)

    def balances(self) -> list[Balance]:
        """Every server's balance (credits minus clawbacks), clawed-back total, work and epochs credited."""
        credited = self._credited_by_peer()
        pending = self._sum_by_peer(
            "SELECT peer_id, SUM(tokens * blocks) FROM work "
            "WHERE epoch NOT IN (SELECT epoch FROM epochs) GROUP BY peer_id"
        )
        forfeited = self._sum_by_peer("SELECT peer_id, SUM(work) FROM clawbacks WHERE kind = 'work' GROUP BY peer_id")
        rows = []
        for peer in sorted(credited.keys() | pending.keys() | forfeited.keys()):
            amount, clawed, work, epochs = credited.get(peer, (0.0, 0.0, 0, 0))
            rows.append(Balance(peer, amount, work, pending.get(peer, 0), epochs, clawed, forfeited.get(peer, 0)))
        return rows

    def _credited_by_peer(self) -> dict[str, tuple[float, float, int, int]]:
        """``peer_id -> (credits minus clawbacks, clawed back, credited work, epochs credited)``."""
        # Each credit is netted against its own clawback before summing, so a fully clawed-back
        # server's balance is exactly 0.0 rather than the rounding left by two sums in different orders.
        rows = self.connection.execute(
            "SELECT credits.peer_id, SUM(credits.amount - COALESCE(c.amount, 0)), SUM(COALESCE(c.amount, 0)), "
            "SUM(credits.work), COUNT(*) FROM credits LEFT JOIN clawbacks AS c "
            "ON c.kind = 'credit' AND c.peer_id = credits.peer_id AND c.epoch = credits.epoch GROUP BY credits.peer_id"
        )
        return {peer: (float(net), float(clawed), int(work), int(n)) for peer, net, clawed, work, n in rows}

    def _sum_by_peer(self, query: str) -> dict[str, int]:
        return {peer: int(total) for peer, total in self.connection.execute(query)}

    def epochs(self, limit: int = 20) -> list[dict]:
        """The ``limit`` most recently closed epochs, newest first, each with its credits."""
        rows = self.connection.execute(
            "SELECT epoch, closed_at, reward, distributed FROM epochs ORDER BY epoch DESC LIMIT ?", (limit,)
        ).fetchall()
        return [
            {
                "epoch": epoch,
                "closed_at": closed_at,
                "reward": reward,
                "distributed": distributed,
                "credits": [credit.__dict__ for credit in self.credits(epoch)],
            }
            for epoch, closed_at, reward, distributed in rows
        ]
