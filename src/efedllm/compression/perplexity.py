"""Windowed perplexity: the text's first ``max_tokens`` tokens cut into non-overlapping windows.

Each window is scored independently (no context carried over), every token after the window's
first is predicted, and the perplexity is ``exp(total NLL / predicted tokens)``: the convention of
the issue's baseline (WikiText-2 test, first 8,192 tokens, 1,024-token windows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# input ids [1, T] -> logits [1, T, V]
LogitsFunction = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_TEXT = Path("..") / "shared" / "data" / "wikitext2-test.raw"


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    predicted_tokens: int
    windows: int

    def to_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "mean_nll": self.mean_nll,
            "predicted_tokens": self.predicted_tokens,
            "windows": self.windows,
        }


def default_text_path(project_root: Path | None = None) -> Path | None:
    """``../shared/data/wikitext2-test.raw`` relative to the project root (or the working directory)."""
    roots = [project_root] if project_root else [Path.cwd(), Path(__file__).resolve().parents[3]]
    for root in roots:
        candidate = (root / DEFAULT_TEXT).resolve()
        if candidate.is_file():
            return candidate
    return None


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens added)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def windowed_perplexity(logits_of: LogitsFunction, token_ids: torch.Tensor, window: int = 1024, max_tokens: int = 8192) -> PerplexityResult:
    """Perplexity of ``token_ids[:max_tokens]`` in windows of ``window`` tokens (a last partial window counts if ≥ 2)."""
    if token_ids.dim() != 1:
        raise ValueError(f"token ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if window < 2 or max_tokens < 2:
        raise ValueError(f"window and max_tokens must be at least 2, got {window} and {max_tokens}")
    ids = token_ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens of text, got {ids.numel()}")
    total, predicted, windows = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, ids.numel(), window):
            chunk = ids[start : start + window][None]  # [1, T]
            if chunk.shape[1] < 2:
                break
            logits = logits_of(chunk)[0, :-1].float()  # [T-1, V]
            total += float(F.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
            predicted += chunk.shape[1] - 1
            windows += 1
    mean = total / predicted
    return PerplexityResult(math.exp(mean), mean, predicted, windows)
