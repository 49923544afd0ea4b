"""OpenAI response objects, built by pure functions: whole completions, stream chunks, usage."""

from __future__ import annotations

import time
import uuid


def completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def whole_completion(chat: bool, request_id: str, model: str, texts: list[str], finish_reasons: list[str],
                     prompt_tokens: int, completion_tokens: int) -> dict:
    """A ``chat.completion`` or ``text_completion`` object with every choice."""
    if chat:
        choices = [{"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                    "finish_reason": reason, "logprobs": None}
                   for index, (text, reason) in enumerate(zip(texts, finish_reasons))]
    else:
        choices = [{"index": index, "text": text, "finish_reason": reason, "logprobs": None}
                   for index, (text, reason) in enumerate(zip(texts, finish_reasons))]
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
            "system_fingerprint": None}


def chunk(chat: bool, request_id: str, model: str, created: int, index: int, text: str | None = None,
          role: bool = False, finish_reason: str | None = None, with_usage_field: bool = False) -> dict:
    """One stream chunk of one choice: a role (chat's first), a text delta, or its finish."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    body = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "system_fingerprint": None}
    if with_usage_field:
        body["usage"] = None
    return body


def usage_chunk(chat: bool, request_id: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    """``stream_options.include_usage``'s last chunk: no choices, the usage."""
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def model_card(model: str, created: int, covered: int, total: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "efedllm-swarm",
            "blocks_total": total, "blocks_covered": covered}
