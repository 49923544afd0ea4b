"""Steps of several sessions in one forward pass equal each session run alone, in every family.

Tiny random models (``efedllm.models.synthetic``) with sliding windows of 8 tokens where the family
has them; the sessions hold 3 to 20 tokens, so some rows slide past the window and others do not.
"""

from __future__ import annotations

import pytest
import torch

from efedllm.common.spans import Span
from efedllm.models.batching import ragged_mask
from efedllm.models.family import FULL, SLIDING
from efedllm.models.families import FAMILIES
from efedllm.models.sessions import SpanInputError, SpanSessions
from efedllm.models.span import load_span
from efedllm.models.synthetic import tiny_config, write_checkpoint

PROMPTS = {"a": 3, "b": 9, "c": 14, "d": 20}  # session -> prompt tokens
TOLERANCE = 1e-4


def test_ragged_mask_hides_padding_and_keeps_each_rows_causal_window():
    lengths = torch.tensor([0, 3])
    full = ragged_mask(lengths, 2, FULL)  # [2, 1, 2, 5]
    assert full.shape == (2, 1, 2, 5)
    assert full[0, 0].tolist() == [[True, False, False, False, False], [True, True, False, False, False]]
    assert full[1, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    sliding = ragged_mask(lengths, 2, SLIDING, window=2)
    assert sliding[1, 0].tolist() == [[False, False, True, True, False], [False, False, False, True, True]]


@pytest.fixture(scope="module", params=list(FAMILIES))
def span_model(request, tmp_path_factory):
    directory = write_checkpoint(tiny_config(request.param), tmp_path_factory.mktemp(request.param) / "hf")
    return load_span(str(directory), 0, 8)


def _random(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _prefilled(model, rows: dict[str, int]) -> SpanSessions:
    sessions = SpanSessions(model)
    for seed, (session_id, tokens) in enumerate(PROMPTS.items()):
        sessions.open(session_id, 64, batch=rows.get(session_id, 1))
        sessions.step(session_id, _random((rows.get(session_id, 1), tokens, model.hidden_size), seed))
    return sessions


def test_merged_decode_steps_equal_each_session_alone(span_model):
    rows = {"c": 2}  # one session of two rows beside sessions of one
    merged, alone = _prefilled(span_model, rows), _prefilled(span_model, rows)
    for step in range(4):
        steps = [(session_id, _random((rows.get(session_id, 1), 1, span_model.hidden_size), 100 * step + index), None)
                 for index, session_id in enumerate(PROMPTS)]
        results = merged.step_many(steps)
        for (session_id, hidden, _), result in zip(steps, results):
            expected = alone.step(session_id, hidden)
            assert torch.allclose(result, expected, atol=TOLERANCE, rtol=TOLERANCE), (session_id, step)
    assert [merged.get(session_id).length for session_id in PROMPTS] == [tokens + 4 for tokens in PROMPTS.values()]


def test_a_batch_mixes_step_lengths_and_refuses_bad_steps_alone(span_model):
    merged, alone = _prefilled(span_model, {}), _prefilled(span_model, {})
    size = span_model.hidden_size
    steps = [("a", _random((1, 5, size), 1), None), ("b", _random((1, 1, size), 2), None),
             ("c", _random((1, 1, size), 3), 99), ("d", _random((1, 1, size), 4), 10), ("zz", _random((1, 1, size), 5), None)]
    results = merged.step_many(steps)
    assert isinstance(results[2], SpanInputError) and "out of order" in str(results[2])
    assert isinstance(results[4], SpanInputError) and "unknown session" in str(results[4])
    for index in (0, 1, 3):  # a prefill chunk, a decode step, and a retried step (cache cropped back to 10)
        session_id, hidden, position = steps[index]
        expected = alone.step(session_id, hidden, position)
        assert torch.allclose(results[index], expected, atol=TOLERANCE, rtol=TOLERANCE), session_id
    assert merged.get("d").length == 11


def test_two_steps_of_one_session_are_not_merged(span_model):
    sessions = _prefilled(span_model, {})
    hidden = _random((1, 1, span_model.hidden_size), 7)
    results = sessions.step_many([("a", hidden, None), ("a", hidden, None)])
    assert isinstance(results[0], torch.Tensor) and isinstance(results[1], SpanInputError)


def test_sub_spans_are_merged_only_with_their_own_blocks(span_model):
    merged, alone = SpanSessions(span_model), SpanSessions(span_model)
    size = span_model.hidden_size
    for sessions in (merged, alone):
        for session_id, blocks in (("x", Span(0, 4)), ("y", Span(0, 4)), ("z", Span(2, 8))):
            sessions.open(session_id, 32, blocks)
            sessions.step(session_id, _random((1, 6, size), ord(session_id)))
    steps = [(session_id, _random((1, 1, size), index), None) for index, session_id in enumerate("xyz")]
    for (session_id, hidden, _), result in zip(steps, merged.step_many(steps)):
        assert torch.allclose(result, alone.step(session_id, hidden), atol=TOLERANCE, rtol=TOLERANCE), session_id
