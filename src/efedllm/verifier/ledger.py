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

SCHEMA_VERSION = 1

_SCHEMA = """
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
    peer_id: str
    balance: float
    credited_work: int
    pending_work: int
    epochs: int


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
        if version > SCHEMA_VERSION:
            raise LedgerError(f"{self.path} has ledger schema {version}; this version reads up to {SCHEMA_VERSION}")
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise LedgerError(f"{self.path}: could not switch to WAL journaling (got {mode!r})")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA foreign_keys=ON")
        connection.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        if self._trace is not None:
            connection.set_trace_callback(self._trace)

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

    def balances(self) -> list[Balance]:
        """Every server's credited total, credited and not-yet-credited work, and epochs credited."""
        credited = {
            peer: (amount, work, epochs)
            for peer, amount, work, epochs in self.connection.execute(
                "SELECT peer_id, SUM(amount), SUM(work), COUNT(*) FROM credits GROUP BY peer_id"
            )
        }
        pending = dict(
            self.connection.execute(
                "SELECT peer_id, SUM(tokens * blocks) FROM work "
                "WHERE epoch NOT IN (SELECT epoch FROM epochs) GROUP BY peer_id"
            ).fetchall()
        )
        rows = []
        for peer in sorted(credited.keys() | pending.keys()):
            amount, work, epochs = credited.get(peer, (0.0, 0, 0))
            rows.append(Balance(peer, float(amount), int(work), int(pending.get(peer, 0)), int(epochs)))
        return rows

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
