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

from efedllm.client.batch_generation import BatchSession, generate_rows, prompt_rows
from efedllm.client.coalesce import CoalescedCalls
from efedllm.client.sampling import GenerationConfig, choose_next_token, sampling_generator
from efedllm.client.token_stream import TokenStream


class InferenceSession(Protocol):
    """A session open across every block: hidden states in, hidden states out."""

    position: int

    def step(self, hidden_states: torch.Tensor) -> torch.Tensor: ...


class AdaptedSession:
    """A generation session through a :class:`~efedllm.client.training.TrainableCausalLM`: ``step(embeddings [1, t, hidden])`` -> the
    last block's outputs for those t positions. It keeps no cache anywhere: every step sends the whole
    sequence so far (servers hold nothing of a client's adapter between requests), so a token costs a pass
    over all the tokens before it."""

    def __init__(self, model) -> None:
        self.model, self.embeddings = model, None

    def step(self, embeddings: torch.Tensor) -> torch.Tensor:
        self.embeddings = embeddings if self.embeddings is None else torch.cat([self.embeddings, embeddings], dim=1)
        with torch.no_grad():
            return self.model.hidden_states(self.embeddings)[:, -embeddings.shape[1]:]


class PromptedSession:
    """An inference session whose sequence starts with soft prompts (prompt tuning: the adapter is only the
    client's input embeddings, so the servers' ordinary KV-cached sessions serve it): ``step`` puts ``prompts``
    [prompts, hidden] in front of the first step's embeddings and hands back the outputs of the steps' own positions."""

    def __init__(self, session, prompts: torch.Tensor) -> None:
        self.session, self.prompts = session, prompts

    def step(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.prompts is None:
            return self.session.step(embeddings)
        prompts, self.prompts = self.prompts, None  # [prompts, hidden], in front of the first step only
        return self.session.step(torch.cat([prompts.unsqueeze(0), embeddings], dim=1))[:, prompts.shape[0]:]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    new_tokens: int
    seconds: float
    time_to_first_token: float
    prompt_tokens: int
    extra: dict = field(default_factory=dict)
    token_times: list[float] = field(default_factory=list)  # perf_counter() of each token chosen, EOS included

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


def _ids_row(ids: list[int]) -> torch.Tensor:
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return torch.tensor([ids], dtype=torch.long)  # [1, tokens]


class CausalLMClient:
    """Base of the local and distributed models: subclasses provide ``parts`` and ``inference_session``."""

    parts = None
    head: CoalescedCalls | None = None  # the LM head shared by concurrent generate() threads (client/coalesce.py)

    def inference_session(self, max_length: int) -> AbstractContextManager[InferenceSession]:
        raise NotImplementedError

    def batch_session(self, max_lengths: list[int]) -> AbstractContextManager[BatchSession]:
        """Sessions for rows of these max lengths (:mod:`efedllm.client.batch_generation`)."""
        raise NotImplementedError

    def encode_prompt(self, prompt: str, chat: bool = True) -> torch.Tensor:
        """Token ids [1, tokens]; instruct models get their chat template (a lone user message)."""
        tokenizer = self.parts.tokenizer
        if chat and getattr(tokenizer, "chat_template", None):
            return self.encode_messages([("user", prompt)])
        return _ids_row(tokenizer(prompt)["input_ids"])

    def encode_messages(self, messages: list[tuple[str, str]]) -> torch.Tensor:
        """Token ids [1, tokens] of a conversation, (role, content) each, ready for the assistant's answer: the
        tokenizer's chat template, or "role: content" lines for a model without one."""
        tokenizer = self.parts.tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in messages],
                                                 add_generation_prompt=True, tokenize=False)
        else:
            text = "\n".join(f"{role}: {content}" for role, content in messages) + "\nassistant:"
        return _ids_row(tokenizer(text, add_special_tokens=False)["input_ids"])

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
            stream, first_token_at, text = self._decode_loop(session, input_ids, config, on_text)
        seconds = time.perf_counter() - started
        return GenerationResult(text, stream.new_ids, len(stream.new_ids), seconds, first_token_at - started, input_ids.shape[1],
                                token_times=stream.times)

    def generate_adapted(self, model, input_ids: torch.Tensor, config: GenerationConfig = GenerationConfig(),
                         on_text: Callable[[str], None] | None = None, cache: bool = True) -> GenerationResult:
        """``generate`` with a fine-tuned adapter: ``model`` is this client's ``trainable(spec, tensors)``
        (:class:`~efedllm.client.training.TrainableCausalLM`). Prompt tuning runs in an ordinary KV-cached
        session (``cache``); LoRA and deep prompts go as requests that carry the adapter (:class:`AdaptedSession`)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, tokens], got shape {tuple(input_ids.shape)}")
        started = time.perf_counter()
        if cache and model.spec.method == "ptune":
            prompts = model.prompts.detach()  # [prompts, hidden]
            with self.inference_session(prompts.shape[0] + input_ids.shape[1] + config.max_new_tokens) as session:
                stream, first_token_at, text = self._decode_loop(PromptedSession(session, prompts), input_ids, config,
                                                                 on_text)
        else:
            stream, first_token_at, text = self._decode_loop(AdaptedSession(model), input_ids, config, on_text)
        return GenerationResult(text, stream.new_ids, len(stream.new_ids), time.perf_counter() - started,
                                first_token_at - started, input_ids.shape[1], {"adapter": model.spec.method},
                                stream.times)

    def generate_batch(
        self,
        prompts: list[str] | list[torch.Tensor] | torch.Tensor,
        config: GenerationConfig = GenerationConfig(),
        attention_mask: torch.Tensor | None = None,
        on_text: Callable[[int, str], None] | None = None,
        chat: bool = True,
    ) -> list[GenerationResult]:
        """Generate after every prompt at once: texts (encoded as ``generate``'s CLI does, with the chat
        template when ``chat``), token id rows [1, tokens] of any lengths, or HF-style padded ``input_ids``
        [batch, tokens] with ``attention_mask``. Each row stops on its own; ``on_text(row, text)`` streams."""
        rows = self._prompt_rows(prompts, attention_mask, chat)
        eos = self.eos_token_ids() if config.stop_on_eos else set()
        with self.batch_session([row.shape[1] + config.max_new_tokens for row in rows]) as session:
            outcomes = generate_rows(self.parts, session, rows, config, eos, on_text)
        return [GenerationResult(outcome["text"], outcome["token_ids"], len(outcome["token_ids"]), outcome["seconds"],
                                 outcome["time_to_first_token"], outcome["prompt_tokens"],
                                 {"finish_reason": outcome["finish_reason"]}, outcome["token_times"]) for outcome in outcomes]

    def _prompt_rows(self, prompts, attention_mask, chat: bool) -> list[torch.Tensor]:
        if isinstance(prompts, torch.Tensor):
            return prompt_rows(prompts, attention_mask)
        if attention_mask is not None:
            raise ValueError("attention_mask goes with input_ids [batch, tokens], not with a list of prompts")
        if not prompts:
            raise ValueError("no prompts to generate for")
        rows = [self.encode_prompt(prompt, chat) if isinstance(prompt, str) else prompt for prompt in prompts]
        for index, row in enumerate(rows):
            if not isinstance(row, torch.Tensor) or row.dim() != 2 or row.shape[0] != 1 or row.shape[1] < 1:
                raise ValueError(f"prompt {index} must be a string or token ids [1, tokens]")
        return rows

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, 1, hidden] -> [rows, 1, vocab], merged with other threads' calls when ``head`` is set."""
        return self.parts.logits(hidden) if self.head is None else self.head(hidden)

    def _decode_loop(self, session, input_ids, config, on_text):
        eos = self.eos_token_ids() if config.stop_on_eos else set()
        generator = sampling_generator(config)
        stream, step_ids, first_token_at = TokenStream(self.parts.tokenizer, input_ids[0], config, eos, on_text), input_ids, 0.0
        for _ in range(config.max_new_tokens):
            hidden = session.step(self.parts.embed(step_ids))  # [1, tokens, hidden]
            logits = self._logits(hidden[:, -1:])[0, -1]  # [vocab]
            token = choose_next_token(logits, stream.history, config, generator, stream.new_ids)
            first_token_at = first_token_at or time.perf_counter()
            if stream.add(token):
                break
            step_ids = torch.tensor([[token]])
        return stream, first_token_at, stream.finish()
