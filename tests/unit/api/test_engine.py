"""The API's continuous batching engine, with the real client parts and a stand-in for the swarm whose blocks
pass hidden states through unchanged (what is tested is the scheduling: joins, stops, cancels, failures)."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
import torch

from efedllm.api.engine import EngineFull, GenerationEngine, Job
from efedllm.client.routing import MissingBlocksError
from efedllm.client.sampling import GenerationConfig


class PassThroughRows:
    """Sessions whose blocks are the identity; a session opened for a poisoned max length fails its steps."""

    def __init__(self, fail_length: int | None = None, missing: bool = False) -> None:
        self.fail_length, self.missing = fail_length, missing
        self.step_sizes: list[int] = []
        self.open_sessions: set[int] = set()
        self.closed: list[int] = []
        self._next = 0
        self._lock = threading.Lock()

    def open(self, max_length: int) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        if self.missing:
            future.set_exception(MissingBlocksError([3, 4]))
            return future
        with self._lock:
            self._next += 1
            session = (self._next, max_length)
            self.open_sessions.add(session[0])
        future.set_result(session)
        return future

    def step(self, sessions, hidden_states):
        self.step_sizes.append(len(sessions))
        time.sleep(0.002)
        return [RuntimeError("hop failed") if length == self.fail_length else hidden
                for (_, length), hidden in zip(sessions, hidden_states)]

    def close(self, session) -> None:
        with self._lock:
            self.open_sessions.discard(session[0])
            self.closed.append(session[0])


class Collector:
    def __init__(self) -> None:
        self.events = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if event.error is not None or event.finish_reason is not None:
            self.done.set()

    def text(self) -> str:
        return "".join(event.text for event in self.events)


def job(client_parts, prompt: str, tokens: int, collector: Collector) -> Job:
    ids = torch.tensor([client_parts.tokenizer(prompt)["input_ids"]])
    return Job([ids], [GenerationConfig(max_new_tokens=tokens, greedy=True, stop_on_eos=False)], collector)


def run_alone(client_parts, prompt: str, tokens: int) -> str:
    engine = GenerationEngine(client_parts, PassThroughRows(), set()).start()
    try:
        collector = Collector()
        engine.submit(job(client_parts, prompt, tokens, collector))
        assert collector.done.wait(30)
        return collector.text()
    finally:
        engine.shutdown()


def test_a_request_joins_one_that_runs_and_both_get_their_own_tokens(client_parts):
    rows = PassThroughRows()
    engine = GenerationEngine(client_parts, rows, set()).start()
    try:
        first, second = Collector(), Collector()
        engine.submit(job(client_parts, "The sky is", 40, first))
        while not first.events:
            time.sleep(0.001)
        engine.submit(job(client_parts, "Numbers:", 10, second))
        assert first.done.wait(30) and second.done.wait(30)
    finally:
        engine.shutdown()
    assert max(rows.step_sizes) == 2 and rows.step_sizes[0] == 1  # the second joined between steps
    assert first.events[-1].finish_reason == "length" and first.events[-1].tokens == 40
    assert second.text() == run_alone(client_parts, "Numbers:", 10)
    assert not rows.open_sessions and len(rows.closed) == 2


def test_a_cancelled_request_leaves_and_closes_its_session(client_parts):
    rows = PassThroughRows()
    engine = GenerationEngine(client_parts, rows, set()).start()
    try:
        collector = Collector()
        submitted = job(client_parts, "Hello", 500, collector)
        engine.submit(submitted)
        while not engine.tokens_total:
            time.sleep(0.001)
        submitted.cancel()
        deadline = time.monotonic() + 10
        while rows.open_sessions:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert engine.stats().active_rows == 0 and engine.tokens_total < 500
    finally:
        engine.shutdown()


def test_a_failing_row_fails_its_request_only(client_parts):
    rows = PassThroughRows(fail_length=99)
    engine = GenerationEngine(client_parts, rows, set()).start()
    try:
        good, bad = Collector(), Collector()
        engine.submit(job(client_parts, "Good", 12, good))
        ids = torch.tensor([client_parts.tokenizer("Bad")["input_ids"]])
        poisoned = GenerationConfig(max_new_tokens=99 - ids.shape[1], greedy=True)
        engine.submit(Job([ids, ids], [poisoned, poisoned], bad))
        assert good.done.wait(30) and bad.done.wait(30)
    finally:
        engine.shutdown()
    assert good.events[-1].finish_reason == "length"
    errors = [event for event in bad.events if event.error is not None]
    assert len(errors) == 1 and errors[0].error_kind == "upstream" and "hop failed" in errors[0].error
    assert not rows.open_sessions


def test_missing_blocks_at_open_are_named(client_parts):
    engine = GenerationEngine(client_parts, PassThroughRows(missing=True), set()).start()
    try:
        collector = Collector()
        engine.submit(job(client_parts, "x", 4, collector))
        assert collector.done.wait(10)
    finally:
        engine.shutdown()
    assert collector.events[-1].error_kind == "missing_blocks" and "3-4" in collector.events[-1].error


def test_waiting_requests_are_bounded(client_parts):
    engine = GenerationEngine(client_parts, PassThroughRows(), set(), max_rows=2, max_pending=1)  # not started
    engine.submit(job(client_parts, "x", 4, Collector()))
    with pytest.raises(EngineFull):
        engine.submit(job(client_parts, "y", 4, Collector()))
    ids = torch.tensor([[1]])
    with pytest.raises(ValueError, match="at most 2 choices"):
        engine.submit(Job([ids] * 3, [GenerationConfig()] * 3, Collector()))
