"""Continuous batching of concurrent API requests in one client.

Every request (a :class:`Job`) has one row per choice; rows of every request step together: one
call sends each row's step to its chain at once (the servers merge them into one pass,
:mod:`efedllm.server.batching`) and the LM head runs once over all rows. A request that arrives
joins at the next step (its rows' sessions open in the background meanwhile, and their prefill goes
in the same step as the others' decode steps); a row that stops closes its sessions at once. A row
chooses its tokens exactly as ``generate`` does (same sampler, same seed), so a request's text
equals ``efedllm generate``'s for the same prompt and settings.

Call order: ``start()``; ``submit(job)`` from any thread (``EngineFull`` past ``max_pending``
waiting requests), ``job.cancel()`` to drop one (a client that disconnected); ``shutdown()``.
Events reach the job's ``emit`` on the engine's thread: text deltas, a finish per choice, or one
error for the whole job.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from efedllm.client.sampling import GenerationConfig, choose_next_token, sampling_generator
from efedllm.client.token_stream import TokenStream
from efedllm.common.errors import EfedllmError

logger = logging.getLogger(__name__)
RATE_WINDOW = 10.0  # seconds over which ``stats()`` reports the tokens/s being served


class EngineFull(EfedllmError, RuntimeError):
    """Too many requests wait already (a 429 for the API)."""


class RowSessions(Protocol):
    """What the engine needs of a model client (:class:`~efedllm.client.batch_session.RemoteRowSessions`)."""

    def open(self, max_length: int) -> concurrent.futures.Future: ...

    def step(self, sessions: list, hidden_states: list[torch.Tensor]) -> list: ...

    def close(self, session) -> object: ...


@dataclass(frozen=True)
class Event:
    """One thing that happened to a job: ``text`` of a choice, its ``finish_reason`` (with its ``tokens``), or
    an ``error`` that ended the whole job (``error_kind``: ``missing_blocks`` or ``upstream``)."""

    choice: int
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    error: str | None = None
    error_kind: str | None = None


@dataclass(eq=False)  # a job is itself: compared by identity
class Job:
    """A request: per choice a prompt [1, tokens] and a config; ``emit`` receives its events."""

    prompts: list[torch.Tensor]
    configs: list[GenerationConfig]
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if not self.prompts or len(self.prompts) != len(self.configs):
            raise ValueError("a job needs one config per prompt, and at least one prompt")

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class _Row:
    job: Job
    choice: int
    stream: TokenStream
    generator: torch.Generator | None
    opening: concurrent.futures.Future | None
    next_ids: torch.Tensor  # [1, tokens]: the prompt, then each chosen token
    session: object = None


@dataclass(frozen=True)
class EngineStats:
    active_rows: int
    opening_rows: int
    waiting_jobs: int
    tokens_per_s: float  # over the last RATE_WINDOW seconds
    tokens_total: int
    steps_total: int


class GenerationEngine:
    """One thread steps every row of every admitted job together. The constructor does no I/O."""

    def __init__(self, parts, rows: RowSessions, eos: set[int], max_rows: int = 32, max_pending: int = 64,
                 on_step: Callable[[int, float], None] | None = None) -> None:
        if max_rows < 1 or max_pending < 1:
            raise ValueError(f"max_rows and max_pending must be >= 1, got {max_rows} and {max_pending}")
        self.parts, self.rows_backend, self.eos = parts, rows, eos
        self.max_rows, self.max_pending, self.on_step = max_rows, max_pending, on_step
        self._pending: collections.deque[Job] = collections.deque()
        self._rows: list[_Row] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._token_times: collections.deque[float] = collections.deque()
        self.tokens_total = self.steps_total = 0

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> "GenerationEngine":
        self._thread = threading.Thread(target=self._run, daemon=True, name="efedllm-api-engine")
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._stopping:
                raise EngineFull("the API is shutting down")
            if len(job.prompts) > self.max_rows:
                raise ValueError(f"a request may have at most {self.max_rows} choices in all, got {len(job.prompts)}")
            if len(self._pending) >= self.max_pending:
                raise EngineFull(f"{len(self._pending)} requests are waiting already (at most {self.max_pending})")
            self._pending.append(job)
            self._wake.notify_all()

    def stats(self) -> EngineStats:
        now = time.perf_counter()
        with self._wake:
            while self._token_times and self._token_times[0] < now - RATE_WINDOW:
                self._token_times.popleft()
            opening = sum(1 for row in self._rows if row.session is None)
            return EngineStats(len(self._rows) - opening, opening, len(self._pending),
                               round(len(self._token_times) / RATE_WINDOW, 3), self.tokens_total, self.steps_total)

    # the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    break
                if not self._rows and not self._pending:
                    self._wake.wait(timeout=1.0)
                    continue
                self._admit()
            try:
                self._iterate()
            except Exception as error:  # a bug must not kill the engine silently: fail what runs, keep serving
                logger.exception("engine step failed")
                for job in {id(row.job): row.job for row in self._rows}.values():
                    self._fail(job, f"internal error: {error!r}", "upstream")
        for job in {id(row.job): row.job for row in self._rows}.values():
            self._fail(job, "the API is shutting down", "upstream")
        while self._pending:
            job = self._pending.popleft()
            job.emit(Event(0, error="the API is shutting down", error_kind="upstream"))

    def _admit(self) -> None:
        """Moves waiting jobs in while their rows fit (called holding the lock); their sessions start opening."""
        while self._pending and len(self._rows) + len(self._pending[0].prompts) <= self.max_rows:
            job = self._pending.popleft()
            if job.cancelled.is_set():
                continue
            for choice, (prompt, config) in enumerate(zip(job.prompts, job.configs)):
                eos = self.eos if config.stop_on_eos else set()
                stream = TokenStream(self.parts.tokenizer, prompt[0], config, eos, _choice_callback(job, choice))
                opening = self.rows_backend.open(prompt.shape[1] + config.max_new_tokens)
                self._rows.append(_Row(job, choice, stream, sampling_generator(config), opening, prompt))

    def _iterate(self) -> None:
        self._drop_cancelled()
        self._take_opened()
        ready = [row for row in self._rows if row.session is not None]
        if not ready:
            opening = [row.opening for row in self._rows if row.opening is not None]
            if opening:
                concurrent.futures.wait(opening, timeout=0.05, return_when=concurrent.futures.FIRST_COMPLETED)
            return
        self._step(ready)

    def _drop_cancelled(self) -> None:
        for job in {id(row.job): row.job for row in self._rows if row.job.cancelled.is_set()}.values():
            self._remove(job)

    def _take_opened(self) -> None:
        for row in [row for row in self._rows if row.opening is not None and row.opening.done()]:
            future, row.opening = row.opening, None
            error = future.exception()
            if error is None:
                row.session = future.result()
            elif row in self._rows:
                kind = "missing_blocks" if type(error).__name__ == "MissingBlocksError" else "upstream"
                self._fail(row.job, f"could not open a session through the swarm: {error}", kind)

    def _step(self, ready: list[_Row]) -> None:
        started = time.perf_counter()
        outputs = self.rows_backend.step([row.session for row in ready], [self.parts.embed(row.next_ids) for row in ready])
        stepped = []
        for row, output in zip(ready, outputs):
            if isinstance(output, BaseException):
                if row in self._rows:
                    self._fail(row.job, f"the swarm failed this request: {output}", "upstream")
            elif row in self._rows:
                stepped.append((row, output))
        if stepped:
            logits = self.parts.logits(torch.cat([output[:, -1:] for _, output in stepped]))[:, -1]  # [rows, vocab]
            for (row, _), row_logits in zip(stepped, logits):
                self._choose(row, row_logits)
        self.steps_total += 1
        if self.on_step is not None:
            self.on_step(len(stepped), time.perf_counter() - started)

    def _choose(self, row: _Row, logits: torch.Tensor) -> None:
        config = row.job.configs[row.choice]
        token = choose_next_token(logits, row.stream.history, config, row.generator, row.stream.new_ids)
        with self._wake:
            self.tokens_total += 1
            self._token_times.append(time.perf_counter())
        if row.job.cancelled.is_set() or row not in self._rows:
            return
        if row.stream.add(token) or len(row.stream.times) >= config.max_new_tokens:
            row.stream.finish()
            self._end_row(row)
            row.job.emit(Event(row.choice, finish_reason=row.stream.finish_reason, tokens=len(row.stream.times)))
        else:
            row.next_ids = torch.tensor([[token]])

    # ending rows -----------------------------------------------------------------------------
    def _end_row(self, row: _Row) -> None:
        with self._wake:
            self._rows.remove(row)
        if row.session is not None:
            self.rows_backend.close(row.session)
        elif row.opening is not None:
            row.opening.add_done_callback(self._close_when_opened)

    def _close_when_opened(self, future: concurrent.futures.Future) -> None:
        if future.exception() is None:
            self.rows_backend.close(future.result())

    def _remove(self, job: Job) -> None:
        for row in [row for row in self._rows if row.job is job]:
            self._end_row(row)

    def _fail(self, job: Job, message: str, kind: str) -> None:
        self._remove(job)
        if not job.cancelled.is_set():
            job.emit(Event(0, error=message, error_kind=kind))
            job.cancel()  # one error per job


def _choice_callback(job: Job, choice: int) -> Callable[[str], None]:
    return lambda text: job.emit(Event(choice, text=text))
