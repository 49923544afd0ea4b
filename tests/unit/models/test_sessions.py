"""Bad inputs to a span raise errors that name what was wrong."""

from __future__ import annotations

import pytest
import torch

from efedllm.common.spans import Span
from efedllm.models.sessions import SpanInputError, SpanSessions, UnknownSessionError
from efedllm.models.sources import ModelNotFoundError, resolve_model
from efedllm.models.span import load_span


@pytest.fixture(scope="module")
def sessions():
    return SpanSessions(load_span("smollm2-135m", 3, 5), max_sessions=2)


def hidden(tokens=2, size=576, dtype=torch.float32):
    return torch.randn(1, tokens, size, dtype=dtype)


def test_step_past_max_length(sessions):
    sessions.open("long", max_length=3)
    sessions.step("long", hidden(2))
    with pytest.raises(SpanInputError, match="max_length 3"):
        sessions.step("long", hidden(2))
    sessions.close("long")


def test_unknown_session(sessions):
    with pytest.raises(UnknownSessionError, match="unknown session 'nope'"):
        sessions.step("nope", hidden())
    with pytest.raises(UnknownSessionError):
        sessions.close("nope")


@pytest.mark.parametrize(
    "bad, message",
    [
        (hidden(size=100), "hidden size 100"),
        (hidden(dtype=torch.float64), "dtype torch.float64"),
        (torch.full((1, 2, 576), float("nan")), "NaN"),
        (torch.randn(2, 576), "shape"),
        ([[1.0]], "must be a tensor"),
    ],
)
def test_bad_hidden_states(sessions, bad, message):
    sessions.open("bad", max_length=8)
    try:
        with pytest.raises(SpanInputError, match=message):
            sessions.step("bad", bad)
    finally:
        sessions.close("bad")


def test_out_of_order_and_retry(sessions):
    sessions.open("order", max_length=8)
    first = sessions.step("order", hidden(3))
    with pytest.raises(SpanInputError, match="out of order"):
        sessions.step("order", hidden(1), position=5)
    step = hidden(1)
    once = sessions.step("order", step, position=3)
    again = sessions.step("order", step, position=3)  # a retried step is idempotent
    assert torch.equal(once, again) and sessions.get("order").length == 4
    assert first.shape == (1, 3, 576)
    sessions.close("order")


def test_limits_and_blocks(sessions):
    sessions.open("a", 4)
    sessions.open("b", 4)
    with pytest.raises(SpanInputError, match="full"):
        sessions.open("c", 4)
    with pytest.raises(SpanInputError, match="already open"):
        sessions.open("a", 4)
    sessions.close("a")
    sessions.close("b")
    with pytest.raises(SpanInputError, match="not inside"):
        sessions.open("d", 4, Span(2, 5))
    assert len(sessions) == 0 and sessions.cached_tokens == 0


def test_sub_span_matches_running_its_blocks(sessions):
    sessions.open("sub", 8, Span(4, 5))
    inputs = hidden(3)
    expected = sessions.model.layers[1](
        inputs, position_embeddings=sessions.model.rotary_emb(inputs, torch.arange(3)[None]), attention_mask=None
    )
    assert torch.allclose(sessions.step("sub", inputs), expected, atol=1e-5)
    sessions.close("sub")


def test_unknown_model_and_span_outside_model():
    with pytest.raises(ModelNotFoundError, match="not an alias"):
        resolve_model("no-such-model")
    with pytest.raises(ValueError, match="exceeds"):
        load_span("smollm2-135m", 25, 31)


def test_a_step_may_not_have_more_rows_than_its_session_was_opened_for(sessions):
    sessions.open("rows", max_length=4, batch=2)
    hidden = torch.randn(2, 1, sessions.model.hidden_size)
    assert sessions.step("rows", hidden).shape == hidden.shape
    with pytest.raises(SpanInputError, match="3 rows"):
        sessions.step("rows", torch.randn(3, 1, sessions.model.hidden_size), position=0)
    sessions.close("rows")


def test_kv_bytes_per_token_counts_keys_and_values_of_each_block(sessions):
    config = sessions.model.config
    per_block = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    assert sessions.model.kv_bytes_per_token() == 2 * per_block
    assert sessions.model.kv_bytes_per_token(Span(3, 4)) == per_block
