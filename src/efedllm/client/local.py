"""The local pipeline: spans run in this process through the same session interface as the swarm."""

from __future__ import annotations

import uuid
from contextlib import contextmanager

import torch

from efedllm.client.coalesce import CoalescedCalls
from efedllm.client.generation import CausalLMClient
from efedllm.client.training import LocalSpanRunner, TrainableCausalLM, initial_tensors
from efedllm.models.adapters import AdapterSpec, TrainableSpan
from efedllm.common.spans import Span
from efedllm.models.sessions import SpanSessions
from efedllm.models.span import ClientParts, SpanModel, load_client_parts, load_span


class LocalInferenceSession:
    """A session across consecutive in-process spans."""

    def __init__(self, span_sessions: list[SpanSessions], session_id: str) -> None:
        self.span_sessions, self.session_id, self.position = span_sessions, session_id, 0

    def step(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for sessions in self.span_sessions:
            hidden_states = sessions.step(self.session_id, hidden_states, self.position)
        self.position += hidden_states.shape[1]
        return hidden_states


class LocalBatchSession:
    """Rows of a batch, each its own session on every in-process span; a step of several rows is one
    merged pass per span (:meth:`~efedllm.models.sessions.SpanSessions.step_many`)."""

    def __init__(self, span_sessions: list[SpanSessions], session_ids: list[str]) -> None:
        self.span_sessions, self.session_ids = span_sessions, session_ids
        self.positions = [0] * len(session_ids)

    def step_rows(self, rows: list[int], hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        for sessions in self.span_sessions:
            results = sessions.step_many([(self.session_ids[row], hidden, self.positions[row])
                                          for row, hidden in zip(rows, hidden_states)])
            for result in results:
                if isinstance(result, Exception):
                    raise result
            hidden_states = results
        for row, hidden in zip(rows, hidden_states):
            self.positions[row] += hidden.shape[1]
        return hidden_states

    def close_row(self, row: int) -> None:
        for sessions in self.span_sessions:
            if self.session_ids[row] in sessions:
                sessions.close(self.session_ids[row])


def check_covering(spans: list[Span], blocks: int) -> None:
    """ValueError unless ``spans`` are consecutive and cover blocks ``0..blocks-1`` (pure)."""
    starts, ends = [span.start for span in spans], [span.end for span in spans]
    if not spans or starts[0] != 0 or ends[-1] != blocks or starts[1:] != ends[:-1]:
        raise ValueError(f"spans {[str(span) for span in spans]} do not cover blocks 0:{blocks} consecutively")


class LocalModelForCausalLM(CausalLMClient):
    """Client parts plus a list of consecutive spans that together cover every block."""

    def __init__(self, parts: ClientParts, spans: list[SpanModel]) -> None:
        check_covering([span.span for span in spans], parts.config.num_hidden_layers)
        self.parts, self.spans = parts, spans
        self.head = CoalescedCalls(parts.logits)
        self.span_sessions = [SpanSessions(span) for span in spans]

    @classmethod
    def load(cls, model: str, spans: list[Span] | None = None, dtype: str | torch.dtype = torch.float32, transform=None,
             quant: str | None = None):
        """Load client parts and each span (int8 weights with ``quant="int8"``); ``transform(span_model)`` may
        rewrite a span (e.g. compression)."""
        parts = load_client_parts(model, dtype)
        spans = spans or [Span(0, parts.config.num_hidden_layers)]
        check_covering(spans, parts.config.num_hidden_layers)  # before any span is loaded
        span_models = [load_span(model, span.start, span.end, dtype, quant) for span in spans]
        if transform is not None:
            for span_model in span_models:
                transform(span_model)
        return cls(parts, span_models)

    def trainable(self, spec: AdapterSpec, tensors: dict[str, torch.Tensor] | None = None, seed: int = 0) -> TrainableCausalLM:
        """A model to fine-tune in this process, span by span as through the swarm (:mod:`efedllm.client.training`)."""
        runners = [LocalSpanRunner(TrainableSpan(span, spec)) for span in self.spans]
        return TrainableCausalLM(self.parts, runners, spec, initial_tensors(self.parts, spec, tensors, seed),
                                 torch.Generator().manual_seed(seed + 1), (tensors or {}).get("prompts"))

    @contextmanager
    def inference_session(self, max_length: int):
        session_id = uuid.uuid4().hex
        for sessions in self.span_sessions:
            sessions.open(session_id, max_length)
        try:
            yield LocalInferenceSession(self.span_sessions, session_id)
        finally:
            for sessions in self.span_sessions:
                sessions.close(session_id)

    @contextmanager
    def batch_session(self, max_lengths: list[int]):
        session = LocalBatchSession(self.span_sessions, [uuid.uuid4().hex for _ in max_lengths])
        try:
            for sessions in self.span_sessions:
                for session_id, max_length in zip(session.session_ids, max_lengths):
                    sessions.open(session_id, max_length)
            yield session
        finally:
            for row in range(len(max_lengths)):
                session.close_row(row)
