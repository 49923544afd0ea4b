"""Generation over a batch of prompts of ragged lengths, with per-row stopping and streaming.

Each row is its own session on every span (a row's cache holds its own length), so rows of any
lengths run together: the servers merge the rows' steps into one pass
(:mod:`efedllm.server.batching`) and the local pipeline merges them the same way
(:meth:`~efedllm.models.sessions.SpanSessions.step_many`). The client computes the LM head of
every active row at once. A row that stops (EOS, a stop string, its token budget) closes its
sessions at once, freeing their cache for others. A row's tokens equal ``generate`` of its prompt
alone with the same config (its sampler is seeded with ``config.seed`` like a single prompt's).

Call order: :func:`prompt_rows` (pure: padded ``input_ids`` + ``attention_mask`` to rows), then
:func:`generate_rows` in a model's ``batch_session``.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

import torch

from efedllm.client.sampling import GenerationConfig, choose_next_token, sampling_generator
from efedllm.client.token_stream import TokenStream


class BatchSession(Protocol):
    """Sessions of several rows across every block, each row at its own length."""

    def step_rows(self, rows: list[int], hidden_states: list[torch.Tensor]) -> list[torch.Tensor]: ...

    def close_row(self, row: int) -> None: ...


def prompt_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Each row's real tokens [1, tokens] of a padded batch [batch, tokens] (left or right padding: the
    mask's ones are the tokens); ValueError for a bad shape, a non-0/1 mask or an empty row."""
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return [row.unsqueeze(0) for row in input_ids]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids' {tuple(input_ids.shape)}")
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ValueError("attention_mask may hold only 0 and 1")
    rows = [ids[mask.bool()].unsqueeze(0) for ids, mask in zip(input_ids, attention_mask)]
    empty = [index for index, row in enumerate(rows) if row.shape[1] == 0]
    if empty:
        raise ValueError(f"rows {empty} of the batch have no tokens (attention_mask all 0)")
    return rows


def generate_rows(parts, session: BatchSession, prompts: list[torch.Tensor], config: GenerationConfig, eos: set[int],
                  on_text: Callable[[int, str], None] | None = None) -> list[dict]:
    """Generates after every prompt [1, tokens]; returns per row its token ids, text, finish reason and the
    seconds to its first and last token. ``on_text(row, text)`` streams each row's text."""
    started = time.perf_counter()
    streams = [TokenStream(parts.tokenizer, prompt[0], config, eos, _row_callback(on_text, row))
               for row, prompt in enumerate(prompts)]
    generators = [sampling_generator(config) for _ in prompts]
    active, step_ids = list(range(len(prompts))), list(prompts)
    for _ in range(config.max_new_tokens):
        if not active:
            break
        hidden = session.step_rows(active, [parts.embed(step_ids[row]) for row in active])  # [1, tokens, hidden] each
        logits = parts.logits(torch.cat([states[:, -1:] for states in hidden]))[:, -1]  # [active rows, vocab]
        for row, row_logits in zip(list(active), logits):
            token = choose_next_token(row_logits, streams[row].history, config, generators[row],
                                      streams[row].new_ids)
            if streams[row].add(token):
                active.remove(row)
                session.close_row(row)
            else:
                step_ids[row] = torch.tensor([[token]])
    return [{"token_ids": stream.new_ids, "text": stream.finish(), "finish_reason": stream.finish_reason,
             "time_to_first_token": stream.times[0] - started if stream.times else 0.0,
             "seconds": stream.times[-1] - started if stream.times else 0.0, "prompt_tokens": prompts[row].shape[1],
             "token_times": stream.times}
            for row, stream in enumerate(streams)]


def _row_callback(on_text, row: int):
    return None if on_text is None else (lambda text: on_text(row, text))
