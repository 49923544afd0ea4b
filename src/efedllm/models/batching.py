"""Steps of several sessions merged into one forward pass over a span (batching across sessions).

Each session keeps its own KV cache (a ``DynamicCache`` of its own length). A merged step stacks
the sessions' rows, gives every row its own positions (``length + 0..tokens-1``) and hands the
layers a :class:`RaggedCache`: each layer's ``update`` appends every session's new keys and values
to that session's own cache and returns them zero-padded to the longest, with a boolean mask per
attention kind that hides the padding (and, for sliding layers, what lies outside the window). The
layers themselves are transformers' own; nothing of attention is re-implemented here.

Call order: :func:`ragged_positions` and :func:`ragged_mask` (pure) build the inputs;
``SpanModel.forward_ragged`` runs the layers with a :class:`RaggedCache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional

from efedllm.models.family import SLIDING


@dataclass(frozen=True)
class RaggedPart:
    """One session of a merged step: its cache, how many rows it has and how many tokens it holds already."""

    cache: object  # the session's DynamicCache
    rows: int
    length: int


def part_lengths(parts: list[RaggedPart]) -> torch.Tensor:
    """Each row's cached length [rows], the rows of a part sharing its length."""
    return torch.cat([torch.full((part.rows,), part.length, dtype=torch.long) for part in parts])


def ragged_positions(lengths: torch.Tensor, tokens: int) -> torch.Tensor:
    """Position ids [rows, tokens]: row r's new tokens sit at lengths[r] .. lengths[r] + tokens - 1."""
    return lengths.unsqueeze(1) + torch.arange(tokens).unsqueeze(0)


def ragged_mask(lengths: torch.Tensor, tokens: int, kind: str, window: int | None = None) -> torch.Tensor:
    """Boolean attention mask [rows, 1, tokens, keys] (True: attend) over keys padded to the longest row.

    Key j of row r is a real token when j < lengths[r] + tokens; query t (at position lengths[r] + t)
    sees keys up to its own position and, in a sliding layer, the last ``window`` of them (transformers'
    ``kv_idx > q_idx - sliding_window``)."""
    keys = int(lengths.max()) + tokens
    query_positions = ragged_positions(lengths, tokens).unsqueeze(-1)  # [rows, tokens, 1]
    key_positions = torch.arange(keys).view(1, 1, keys)
    mask = key_positions <= query_positions
    if kind == SLIDING and window:
        mask &= key_positions > query_positions - window
    return mask.unsqueeze(1)


class RaggedCache:
    """What the layers of a merged step write to: each session's rows go to that session's own cache.

    ``update`` is the one method transformers' attention layers call (``cache.update(keys, values,
    layer_idx, ...)``); it returns keys and values [rows, kv_heads, longest, head_dim], padded with zeros
    that :func:`ragged_mask` hides."""

    def __init__(self, parts: list[RaggedPart], tokens: int) -> None:
        self.parts, self.tokens = parts, tokens
        self.keys = max(part.length for part in parts) + tokens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values, row = [], [], 0
        for part in self.parts:
            rows = slice(row, row + part.rows)
            part_keys, part_values = part.cache.update(key_states[rows], value_states[rows], layer_idx)
            keys.append(self._padded(part_keys))
            values.append(self._padded(part_values))
            row += part.rows
        if len(keys) == 1:
            return keys[0], values[0]
        return torch.cat(keys), torch.cat(values)

    def _padded(self, states: torch.Tensor) -> torch.Tensor:
        missing = self.keys - states.shape[2]
        return states if missing == 0 else functional.pad(states, (0, 0, 0, missing))
