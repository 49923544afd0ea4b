"""Inference sessions on a span: one KV cache per session, validated steps.

A step carries hidden states [batch, tokens, hidden] and the ``position`` at which they start.
``position`` equal to the session's length appends; below it, the cache is cropped back first,
so a retried step is idempotent; above it, the step is out of order and refused.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from efedllm.common.dtypes import dtype_name
from efedllm.common.errors import EfedllmError
from efedllm.common.spans import Span
from efedllm.models.batching import RaggedPart
from efedllm.models.span import SpanModel


class SpanInputError(EfedllmError, ValueError):
    """A step or session request that this span cannot serve; the message names what was wrong."""


class UnknownSessionError(SpanInputError):
    """A request names a session this span does not hold (never opened, closed, or expired)."""


@dataclass
class Session:
    session_id: str
    blocks: Span
    max_length: int
    cache: object
    length: int = 0
    batch: int = 1


class SpanSessions:
    """The sessions open on one span, bounded in number and in cached tokens."""

    def __init__(self, model: SpanModel, max_sessions: int = 64, max_length_limit: int | None = None) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.model = model
        self.max_sessions = max_sessions
        self.max_length_limit = max_length_limit or model.config.max_position_embeddings
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    @property
    def cached_tokens(self) -> int:
        return sum(session.length for session in list(self._sessions.values()))

    def check_open(self, session_id: str, max_length: int, blocks: Span) -> None:
        """SpanInputError unless a session could be opened so (capacity aside): what a server checks before
        it evicts anything to make room."""
        if not self.model.span.contains(blocks):
            raise SpanInputError(f"blocks {blocks} are not inside this server's span {self.model.span}")
        if not 1 <= max_length <= self.max_length_limit:
            raise SpanInputError(f"max_length {max_length} must be between 1 and {self.max_length_limit}")
        if session_id in self._sessions:
            raise SpanInputError(f"session {session_id!r} is already open")

    def open(self, session_id: str, max_length: int, blocks: Span | None = None, batch: int = 1) -> Session:
        blocks = blocks or self.model.span
        with self._lock:
            self.check_open(session_id, max_length, blocks)
            if len(self._sessions) >= self.max_sessions:
                raise SpanInputError(f"server is full: {self.max_sessions} sessions open")
            session = Session(session_id, blocks, max_length, self.model.new_cache(), batch=batch)
            self._sessions[session_id] = session
        return session

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise UnknownSessionError(f"unknown session {session_id!r}") from None

    def close(self, session_id: str) -> None:
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                raise UnknownSessionError(f"unknown session {session_id!r}")

    def step(self, session_id: str, hidden_states: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Run one step of a session; returns hidden states of the same shape."""
        session, position = self._prepared(session_id, hidden_states, position)
        return self._run_alone(session, hidden_states, position)

    def _run_alone(self, session: Session, hidden_states: torch.Tensor, position: int) -> torch.Tensor:
        with torch.inference_mode():
            outputs = self.model(hidden_states, position=position, cache=session.cache, blocks=session.blocks)
        session.length = position + hidden_states.shape[1]
        return outputs

    def step_many(self, steps: list[tuple[str, torch.Tensor, int | None]]) -> list[torch.Tensor | SpanInputError]:
        """Steps (session id, hidden states, position) of distinct sessions, run as one forward pass where they
        fit together (:mod:`efedllm.models.batching`): the same blocks and the same number of tokens. Returns,
        per step in order, its outputs or the SpanInputError that refused it (the others still run)."""
        results: list = [None] * len(steps)
        groups: dict[tuple, list] = {}
        seen: set[str] = set()
        for index, (session_id, hidden_states, position) in enumerate(steps):
            try:
                if session_id in seen:
                    raise SpanInputError(f"two steps of session {session_id!r} in one batch")
                seen.add(session_id)
                session, position = self._prepared(session_id, hidden_states, position)
            except SpanInputError as error:
                results[index] = error
                continue
            groups.setdefault((session.blocks, hidden_states.shape[1]), []).append((index, session, hidden_states, position))
        for (blocks, tokens), members in groups.items():
            for (index, _, _, _), outputs in zip(members, self._run_group(blocks, tokens, members)):
                results[index] = outputs
        return results

    def _run_group(self, blocks: Span, tokens: int, members: list) -> list[torch.Tensor]:
        """One forward over sessions of the same blocks and step length; (index, session, hidden, position) each."""
        if len(members) == 1:
            _, session, hidden_states, position = members[0]
            return [self._run_alone(session, hidden_states, position)]
        parts = [RaggedPart(session.cache, hidden_states.shape[0], position) for _, session, hidden_states, position in members]
        with torch.inference_mode():
            outputs = self.model.forward_ragged(torch.cat([member[2] for member in members]), parts, blocks)
        for _, session, _, position in members:
            session.length = position + tokens
        return list(outputs.split([part.rows for part in parts]))

    def _prepared(self, session_id: str, hidden_states: torch.Tensor, position: int | None) -> tuple[Session, int]:
        """(the session, the step's position) once the step is checked, its cache cropped back to ``position``."""
        session = self.get(session_id)
        self.validate_hidden(hidden_states)
        position = session.length if position is None else position
        tokens = hidden_states.shape[1]
        if hidden_states.shape[0] > session.batch:
            raise SpanInputError(f"step of {hidden_states.shape[0]} rows sent to session {session_id!r} opened for "
                                 f"batch {session.batch}")
        if position > session.length:
            raise SpanInputError(
                f"step at position {position} is out of order: session {session_id!r} holds {session.length} tokens"
            )
        if position + tokens > session.max_length:
            raise SpanInputError(
                f"step of {tokens} tokens at position {position} exceeds the session's max_length {session.max_length}"
            )
        if position < session.length:
            session.cache = self._cropped(session, position)
        return session, position

    def _cropped(self, session: Session, position: int):
        if position == 0:
            return self.model.new_cache()
        session.cache.crop(position - session.length)  # a negative count removes that many tokens
        return session.cache

    def validate_hidden(self, hidden_states: torch.Tensor) -> None:
        if not isinstance(hidden_states, torch.Tensor):
            raise SpanInputError(f"hidden states must be a tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() != 3 or hidden_states.shape[0] < 1 or hidden_states.shape[1] < 1:
            raise SpanInputError(f"hidden states must be [batch, tokens, hidden], got shape {tuple(hidden_states.shape)}")
        if hidden_states.shape[-1] != self.model.hidden_size:
            raise SpanInputError(
                f"hidden size {hidden_states.shape[-1]} does not match the model's {self.model.hidden_size}"
            )
        if hidden_states.dtype != self.model.dtype:
            raise SpanInputError(
                f"hidden states have dtype {hidden_states.dtype}, this span runs {dtype_name(self.model.dtype)}"
            )
        if not torch.isfinite(hidden_states).all():
            raise SpanInputError("hidden states contain NaN or infinite values")
