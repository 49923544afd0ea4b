"""The batching plan (pure) and the batcher on a real span: concurrent steps merge, prefills chunk, results equal solo."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from efedllm.models.sessions import SpanInputError, SpanSessions
from efedllm.models.span import load_span
from efedllm.models.synthetic import tiny_config, write_checkpoint
from efedllm.server.batching import BatchLimits, StepBatcher, WaitingStep, fair_order, plan_pass

SESSION_NUMBERS = itertools.count()


def _waiting(owner: str, tokens: int = 1, rows: int = 1, session: str | None = None) -> WaitingStep:
    return WaitingStep(session or f"{owner}-{next(SESSION_NUMBERS)}", owner, rows, tokens)


def test_fair_order_takes_one_step_of_each_owner_in_turn():
    waiting = [_waiting("a"), _waiting("a"), _waiting("a"), _waiting("b"), _waiting("c"), _waiting("b")]
    assert fair_order(waiting) == [0, 3, 4, 1, 5, 2]


def test_a_full_pass_keeps_every_owner_in_it():
    waiting = [_waiting("greedy") for _ in range(10)] + [_waiting("other")]
    plan = plan_pass(waiting, BatchLimits(max_rows=4))
    assert len(plan) == 4 and 10 in [index for index, _ in plan]  # the other peer's step is not queued behind ten


def test_decode_steps_come_first_and_a_long_prefill_runs_in_chunks_beside_them():
    limits = BatchLimits(max_rows=8, max_tokens=40, min_chunk=16)
    waiting = [_waiting("a", tokens=500), _waiting("b"), _waiting("c")]
    assert plan_pass(waiting, limits) == [(1, 1), (2, 1), (0, 38)]
    crowded = [_waiting("a", tokens=500)] + [_waiting(f"p{index}") for index in range(8)]
    assert plan_pass(crowded, limits)[-1] == (0, 32)
    crowded = [_waiting("a", tokens=500)] + [_waiting(f"p{index}") for index in range(40)]
    assert plan_pass(crowded, BatchLimits(max_rows=64, max_tokens=40, min_chunk=16))[-1] == (0, 16)  # however full the pass, a prefill gets its chunk
    assert plan_pass([_waiting("a", tokens=10)], limits) == [(0, 10)]


def test_a_second_step_of_one_session_waits_for_the_next_pass():
    waiting = [_waiting("a", session="s"), _waiting("a", session="s"), _waiting("a", tokens=9, session="s")]
    assert plan_pass(waiting, BatchLimits()) == [(0, 1)]


def test_limits_are_validated():
    with pytest.raises(ValueError, match="batch limits"):
        BatchLimits(max_rows=0)


@pytest.fixture(scope="module")
def tiny_span(tmp_path_factory):
    return load_span(str(write_checkpoint(tiny_config("mistral"), tmp_path_factory.mktemp("mistral") / "hf")), 0, 8)


def _random(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


async def _in_thread(function, *args):
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def test_concurrent_steps_merge_into_passes_and_equal_each_session_alone(tiny_span):
    batched, alone = SpanSessions(tiny_span), SpanSessions(tiny_span)
    prompts = {f"s{index}": _random((1, 3 + 4 * index, tiny_span.hidden_size), index) for index in range(6)}
    for sessions in (batched, alone):
        for session_id in prompts:
            sessions.open(session_id, 128)
    expected = {session_id: alone.step(session_id, hidden, 0) for session_id, hidden in prompts.items()}
    long_prompt = _random((1, 90, tiny_span.hidden_size), 99)
    batched.open("long", 128)
    expected_long = alone.step(alone.open("long", 128).session_id, long_prompt, 0)

    async def scenario():
        batcher = StepBatcher(batched, _in_thread, BatchLimits(max_tokens=40, min_chunk=16))
        results = await asyncio.gather(batcher.run("long", "peer-b", long_prompt, 0),
                                       *(batcher.run(session_id, "peer-a", hidden, 0)
                                         for session_id, hidden in prompts.items()),
                                       batcher.run("missing", "peer-a", long_prompt[:, :1], 0),
                                       return_exceptions=True)
        await batcher.shutdown()
        return results, batcher.passes

    results, passes = asyncio.run(scenario())
    assert torch.allclose(results[0], expected_long, atol=1e-4, rtol=1e-4)
    for result, session_id in zip(results[1:7], prompts):
        assert torch.allclose(result, expected[session_id], atol=1e-4, rtol=1e-4), session_id
    assert isinstance(results[7], SpanInputError) and "unknown session" in str(results[7])
    assert passes < len(prompts) + 1 + 90 // 16  # steps merged, not one pass each
    assert batched.get("long").length == 90
