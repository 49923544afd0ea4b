"""Continuous batching across sessions: steps that arrive while the span computes join the next pass.

:func:`plan_pass` (pure) chooses what one forward pass runs: every waiting short step first (decode
steps, in a round-robin over the peers that own them, so that one peer's many sessions cannot starve
another's; at most ``max_rows`` rows), then the long steps (prefills) in the same order, a chunk of
each as far as ``max_tokens`` rows × tokens allows, and at least ``min_chunk`` tokens of one, so that
a long prefill neither blocks decode steps for its whole length nor starves behind them.

:class:`StepBatcher` runs the plans: ``run`` queues a step and returns its outputs once every chunk
of it has run; one worker task takes the queue as it stands after each pass (a step that arrives
while a pass computes waits only for that pass) and runs it with
:meth:`~efedllm.models.sessions.SpanSessions.step_many`, whose batches equal each session run alone.
A pass of a single one-token row runs on the event loop (the thread hand-off costs more than it runs:
~1.8 ms per hop measured); any other pass runs on the compute thread and leaves the loop free to
receive the next steps. Call order: ``run`` from handlers, ``shutdown`` once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import torch

from efedllm.models.sessions import SpanSessions

logger = logging.getLogger(__name__)
# Event-loop iterations the worker lets pass before it plans: a step already readable on a socket takes a
# few (read, unframe, parse, handler) to reach the queue. With one, passes after a quick pass held a
# single row each: 32 concurrent sessions ran one row per pass (23.5 tokens/s, benchmarks/throughput.py).
GATHER_ITERATIONS = 8


@dataclass(frozen=True)
class BatchLimits:
    max_rows: int = 64  # rows of short steps merged into one pass
    max_tokens: int = 256  # rows × tokens of one pass, short steps and prefill chunks together
    min_chunk: int = 32  # tokens of a long step that run in every pass it waits for
    short_tokens: int = 1  # a step of at most this many tokens is short (a decode step): never chunked

    def __post_init__(self) -> None:
        if min(self.max_rows, self.max_tokens, self.min_chunk, self.short_tokens) < 1:
            raise ValueError(f"batch limits must all be >= 1, got {self}")


@dataclass(frozen=True)
class WaitingStep:
    """What the plan knows of a queued step."""

    session_id: str
    owner: str  # the peer that owns the session (fairness counts per owner)
    rows: int
    tokens: int  # tokens of it not yet run


def fair_order(waiting: list[WaitingStep]) -> list[int]:
    """Indices of ``waiting`` (in arrival order) round-robin over owners: each owner's first step, then
    each owner's second, and so on."""
    seen: dict[str, int] = {}
    ranks = []
    for index, step in enumerate(waiting):
        ranks.append((seen.get(step.owner, 0), index))
        seen[step.owner] = seen.get(step.owner, 0) + 1
    return [index for _, index in sorted(ranks)]


def plan_pass(waiting: list[WaitingStep], limits: BatchLimits) -> list[tuple[int, int]]:
    """(index into ``waiting``, tokens to run now) for one pass; empty only when nothing waits. A session's
    second queued step (a retry sent while the first still waits) waits for a later pass."""
    order, plan, budget, rows, sessions = fair_order(waiting), [], limits.max_tokens, 0, set()
    for index in order:
        step = waiting[index]
        if step.tokens <= limits.short_tokens and step.session_id not in sessions and \
                (rows == 0 or rows + step.rows <= limits.max_rows):
            plan.append((index, step.tokens))
            rows += step.rows
            budget -= step.rows * step.tokens
            sessions.add(step.session_id)
    chunked = False
    for index in order:
        step = waiting[index]
        if step.tokens <= limits.short_tokens or step.session_id in sessions:
            continue
        take = min(step.tokens, max(budget, 0) // step.rows)
        if take == 0 and not chunked:
            take = min(step.tokens, limits.min_chunk)
        if take == 0:
            break
        plan.append((index, take))
        budget -= take * step.rows
        chunked = True
        sessions.add(step.session_id)
    return plan


@dataclass(eq=False)
class _Queued:
    session_id: str
    owner: str
    hidden: torch.Tensor  # [rows, tokens, hidden]
    position: int
    future: asyncio.Future
    done: int = 0  # tokens run so far
    outputs: list = field(default_factory=list)  # [rows, chunk, hidden] per chunk run

    def waiting(self) -> WaitingStep:
        return WaitingStep(self.session_id, self.owner, self.hidden.shape[0], self.hidden.shape[1] - self.done)


class StepBatcher:
    """Runs the steps of a span's sessions in merged passes (module docstring); ``compute(function, *args)``
    runs blocking work on the compute thread."""

    def __init__(self, sessions: SpanSessions, compute, limits: BatchLimits = BatchLimits()) -> None:
        self.sessions, self.compute, self.limits = sessions, compute, limits
        self._queue: list[_Queued] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.passes = self.merged_rows = 0  # what metrics and tests read: passes run, rows run in them

    async def run(self, session_id: str, owner: str, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """The step's outputs [rows, tokens, hidden]; raises what refused it (SpanInputError, ...)."""
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        queued = _Queued(session_id, owner, hidden, position, asyncio.get_running_loop().create_future())
        self._queue.append(queued)
        self._wake.set()
        return await queued.future

    async def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for queued in self._queue:
            if not queued.future.done():
                queued.future.cancel()
        self._queue.clear()

    async def _work(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            for _ in range(GATHER_ITERATIONS):  # steps already on the sockets join this pass
                await asyncio.sleep(0)
            self._queue = [queued for queued in self._queue if not queued.future.done()]  # callers that gave up
            plan = plan_pass([queued.waiting() for queued in self._queue], self.limits)
            if plan:
                await self._run_pass([(self._queue[index], take) for index, take in plan])

    async def _run_pass(self, chosen: list[tuple[_Queued, int]]) -> None:
        steps = [(queued.session_id, queued.hidden[:, queued.done:queued.done + take], queued.position + queued.done)
                 for queued, take in chosen]
        try:
            # every pass on the one compute thread, none inline on the event loop: each thread that runs torch ops
            # gets an OpenMP team of its own, and two teams on two cores measured 51 ms a 30-block decode step
            # against 29 ms for one (libgomp throttles its workers' spinning once they outnumber the cores)
            results = await self.compute(self.sessions.step_many, steps)
        except Exception as error:  # a bug in a pass fails the steps in it, not the worker
            logger.exception("a batched pass failed")
            results = [error] * len(steps)
        self.passes += 1
        self.merged_rows += sum(hidden.shape[0] for _, hidden, _ in steps)
        for (queued, take), result in zip(chosen, results):
            self._settle(queued, take, result)

    def _settle(self, queued: _Queued, take: int, result) -> None:
        """Records a chunk's outcome; the step's future resolves after its last chunk or its first error."""
        if queued.future.done():
            return
        if isinstance(result, BaseException):
            queued.future.set_exception(result)
        else:
            queued.outputs.append(result)
            queued.done += take
            if queued.done == queued.hidden.shape[1]:
                outputs = queued.outputs[0] if len(queued.outputs) == 1 else torch.cat(queued.outputs, dim=1)
                queued.future.set_result(outputs)
        if queued.future.done():
            self._queue.remove(queued)
