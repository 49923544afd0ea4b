"""One generated row's tokens and text: stopping on EOS or a stop string, and streaming text as it firms up.

Shared by the single-prompt and the batched generation loops, so both stop and stream alike.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from efedllm.client.sampling import GenerationConfig, find_stop, held_back_length


class TokenStream:
    """Call order: ``add(token)`` per chosen token until it returns True or the budget ends, then ``finish()``."""

    def __init__(self, tokenizer, prompt_ids: torch.Tensor, config: GenerationConfig, eos: set[int],
                 on_text: Callable[[str], None] | None = None) -> None:
        self.tokenizer, self.config, self.eos, self.on_text = tokenizer, config, eos, on_text
        self.history = prompt_ids  # [tokens]: what repetition penalties see
        self.new_ids: list[int] = []
        self.streamed = self.text = ""
        self.finish_reason = "length"  # "stop" once EOS or a stop string ended it
        self.cut = False  # a stop string ended it
        self.times: list[float] = []  # time.perf_counter() of each token chosen (inter-token latency)

    def add(self, token: int) -> bool:
        """Takes the next token; True when the row stops here (EOS, not kept, or a stop string, text cut before it)."""
        self.times.append(time.perf_counter())
        if token in self.eos:
            self.finish_reason = "stop"
            return True
        self.new_ids.append(token)
        self.history = torch.cat([self.history, torch.tensor([token])])
        if self.on_text is None and not self.config.stop_strings:
            return False
        text = self.tokenizer.decode(self.new_ids, skip_special_tokens=True)
        stop_at = find_stop(text, self.config.stop_strings)
        if stop_at is not None:
            text, self.finish_reason, self.cut = text[:stop_at], "stop", True
        if self.on_text is not None and stop_at is None:
            self._stream(text[: len(text) - held_back_length(text, self.config.stop_strings)])
        self.text = text
        return stop_at is not None

    def finish(self) -> str:
        """The row's text, the rest of it streamed; after a stop string, the text cut before it."""
        text = self.text if self.cut else self.tokenizer.decode(self.new_ids, skip_special_tokens=True)
        if self.on_text is not None and len(text) > len(self.streamed):
            self.on_text(text[len(self.streamed):])
            self.streamed = text
        return text

    def _stream(self, text: str) -> None:
        """Sends what ``text`` adds to what was streamed; an incomplete UTF-8 character waits for its next token."""
        if len(text) > len(self.streamed) and not text.endswith("\ufffd"):
            self.on_text(text[len(self.streamed):])
            self.streamed = text
