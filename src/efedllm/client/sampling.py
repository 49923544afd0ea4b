"""Choosing the next token from logits: pure functions, unit-tested offline."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. ``greedy`` ignores temperature/top-k/top-p; ``seed`` makes sampling repeatable.
    ``presence_penalty`` and ``frequency_penalty`` are OpenAI's (in [-2, 2], over the generated tokens only);
    ``repetition_penalty`` is transformers' (over prompt and generated tokens)."""

    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_on_eos: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not isinstance(self.stop_strings, tuple) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError("stop_strings must be a tuple of non-empty strings")


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers applies it): divide positive, multiply negative logits."""
    if penalty == 1.0 or previous_ids.numel() == 0:
        return logits
    logits = logits.clone()
    seen = torch.unique(previous_ids)
    scores = logits[seen]
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def apply_openai_penalties(logits: torch.Tensor, generated_ids: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: ``logits[j] -= count[j] * frequency + (count[j] > 0) * presence`` over the tokens
    generated so far (not the prompt's). logits: [vocab]."""
    if (presence == 0.0 and frequency == 0.0) or not generated_ids:
        return logits
    counts = torch.bincount(torch.tensor(generated_ids), minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. logits: [vocab]."""
    logits = logits.clone()
    if 0 < top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k).values[-1]
        logits[logits < threshold] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        logits[order[remove]] = float("-inf")
    return logits


def sampling_generator(config: GenerationConfig) -> torch.Generator | None:
    """The random generator a generation samples with: seeded by ``config.seed``, or None (torch's global one)."""
    return torch.Generator().manual_seed(config.seed) if config.seed is not None else None


def choose_next_token(
    logits: torch.Tensor, previous_ids: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None,
    generated_ids: list[int] = (),
) -> int:
    """The next token id from the last position's logits [vocab]; ``previous_ids`` [tokens] are the prompt's and
    the generated ones (repetition penalty), ``generated_ids`` the generated ones (OpenAI's penalties)."""
    logits = apply_repetition_penalty(logits.float(), previous_ids, config.repetition_penalty)
    logits = apply_openai_penalties(logits, list(generated_ids), config.presence_penalty, config.frequency_penalty)
    if config.greedy:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / config.temperature, config.top_k, config.top_p)
    probabilities = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def held_back_length(text: str, stop_strings: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could begin a stop string: streaming holds them back until the
    next tokens show whether the stop string follows (so streamed text equals the final, cut text)."""
    longest = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def find_stop(text: str, stop_strings: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    positions = [text.find(stop) for stop in stop_strings if stop in text]
    return min(positions) if positions else None
