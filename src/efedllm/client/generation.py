"""The generation loop shared by the local pipeline and the distributed client.

A model client supplies ``parts`` (tokenizer, embeddings, LM head) and ``inference_session``;
this loop does prefill, decode steps, token choice, stopping and streaming. It is the same
code whether the blocks run in this process or across a swarm.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from efedllm.client.sampling import GenerationConfig, choose_next_token, find_stop


class InferenceSession(Protocol):
    """A session open across every block: hidden states in, hidden states out."""

    position: int

    def step(self, hidden_states: torch.Tensor) -> torch.Tensor: ...


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    new_tokens: int
    seconds: float
    time_to_first_token: float
    prompt_tokens: int
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "new_tokens": self.new_tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "time_to_first_token": round(self.time_to_first_token, 4),
            **self.extra,
        }


class CausalLMClient:
    """Base of the local and distributed models: subclasses provide ``parts`` and ``inference_session``."""

    parts = None

    def inference_session(self, max_length: int) -> AbstractContextManager[InferenceSession]:
        raise NotImplementedError

    def encode_prompt(self, prompt: str, chat: bool = True) -> torch.Tensor:
        """Token ids [1, tokens]; instruct models get their chat template."""
        tokenizer = self.parts.tokenizer
        if chat and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        return torch.tensor([ids], dtype=torch.long)

    def eos_token_ids(self) -> set[int]:
        ids = self.parts.config.eos_token_id
        ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
        if self.parts.tokenizer.eos_token_id is not None:
            ids.add(self.parts.tokenizer.eos_token_id)
        return ids

    def generate(
        self,
        input_ids: torch.Tensor,
        config: GenerationConfig = GenerationConfig(),
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Generate after ``input_ids`` [1, tokens]; ``on_text`` receives text as it is produced."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, tokens], got shape {tuple(input_ids.shape)}")
        started = time.perf_counter()
        with self.inference_session(max_length=input_ids.shape[1] + config.max_new_tokens) as session:
            new_ids, first_token_at, text = self._decode_loop(session, input_ids, config, on_text)
        seconds = time.perf_counter() - started
        return GenerationResult(text, new_ids, len(new_ids), seconds, first_token_at - started, input_ids.shape[1])

    def _decode_loop(self, session, input_ids, config, on_text):
        tokenizer, eos = self.parts.tokenizer, self.eos_token_ids() if config.stop_on_eos else set()
        generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        history, new_ids, streamed, first_token_at = input_ids[0], [], "", 0.0
        step_ids = input_ids
        for _ in range(config.max_new_tokens):
            hidden = session.step(self.parts.embed(step_ids))  # [1, tokens, hidden]
            logits = self.parts.logits(hidden[:, -1:])[0, -1]  # [vocab]
            token = choose_next_token(logits, history, config, generator)
            first_token_at = first_token_at or time.perf_counter()
            if token in eos:
                break
            new_ids.append(token)
            history = torch.cat([history, torch.tensor([token])])
            step_ids = torch.tensor([[token]])
            if on_text is None and not config.stop_strings:
                continue
            text = tokenizer.decode(new_ids, skip_special_tokens=True)
            stop_at = find_stop(text, config.stop_strings)
            if stop_at is not None:
                text = text[:stop_at]
            if on_text is not None and len(text) > len(streamed) and not text.endswith("\ufffd"):
                on_text(text[len(streamed):])
                streamed = text
            if stop_at is not None:
                return new_ids, first_token_at, text
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        if on_text is not None and len(text) > len(streamed):
            on_text(text[len(streamed):])
        return new_ids, first_token_at, text
