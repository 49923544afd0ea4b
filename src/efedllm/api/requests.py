"""OpenAI request bodies, checked strictly: pure functions from a decoded JSON body to a :class:`CompletionRequest`,
or an :class:`ApiError` in OpenAI's error shape naming the parameter that was wrong.

Sampling follows OpenAI's meaning, not transformers' defaults: ``temperature`` 1 and ``top_p`` 1 by
default, ``temperature`` 0 is greedy, no top-k. A parameter that this server cannot honour
(``logprobs``, tools, ``logit_bias``, ``echo``, ...) is a 400 naming it, never silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from efedllm.client.sampling import GenerationConfig

MAX_STOP_STRINGS = 4
MAX_CHOICES = 16
ROLES = ("system", "user", "assistant", "developer")
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}  # no effect on what is generated
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "presence_penalty", "frequency_penalty",
          "stream", "stream_options", "logprobs", "logit_bias"} | IGNORED
CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
             "response_format"}
TEXT_ONLY = {"prompt", "echo", "suffix", "best_of"}


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    """A checked request. ``prompts``: chat: one tuple of ``(role, content)`` messages; text: strings or token
    id tuples. ``n`` choices per prompt; ``max_tokens`` None means "up to the context's end"."""

    chat: bool
    model: str
    prompts: tuple
    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    seed: int | None
    stop: tuple[str, ...]
    presence_penalty: float
    frequency_penalty: float
    stream: bool
    include_usage: bool

    def generation_config(self, choice: int, max_new_tokens: int) -> GenerationConfig:
        """Choice ``choice``'s config; with a seed, choice j samples with ``seed + j`` (choices differ, repeatably)."""
        return GenerationConfig(max_new_tokens=max_new_tokens, greedy=self.temperature == 0,
                                temperature=self.temperature if self.temperature > 0 else 1.0, top_k=0, top_p=self.top_p,
                                seed=None if self.seed is None else self.seed + choice, stop_strings=self.stop,
                                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)


def parse_chat_request(body: object) -> CompletionRequest:
    body = _object(body)
    _check_names(body, COMMON | CHAT_ONLY)
    _unsupported(body, {"tools": None, "functions": None, "tool_choice": None, "function_call": None, "logit_bias": None,
                        "logprobs": False, "top_logprobs": None})
    if body.get("response_format") not in (None, {"type": "text"}):
        raise ApiError(400, "response_format other than {\"type\": \"text\"} is not supported", param="response_format",
                       code="unsupported_parameter")
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    max_tokens = _optional_int(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens", 1)
    return _request(body, True, (_messages(body.get("messages")),), max_tokens)


def parse_completion_request(body: object) -> CompletionRequest:
    body = _object(body)
    _check_names(body, COMMON | TEXT_ONLY)
    _unsupported(body, {"echo": False, "suffix": None, "logit_bias": None, "logprobs": None})
    n = _optional_int(body, "n", 1) or 1
    if body.get("best_of") not in (None, n):
        raise ApiError(400, "best_of other than n is not supported", param="best_of", code="unsupported_parameter")
    return _request(body, False, _prompts(body.get("prompt")), _optional_int(body, "max_tokens", 1))


def _request(body: dict, chat: bool, prompts: tuple, max_tokens: int | None) -> CompletionRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (a string; GET /v1/models lists it)", param="model")
    n = _optional_int(body, "n", 1) or 1
    if n > MAX_CHOICES:
        raise ApiError(400, f"n may be at most {MAX_CHOICES}, got {n}", param="n")
    stream_options = body.get("stream_options")
    stream = _bool(body, "stream", False)
    if stream_options is not None and (not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}
                                       or not isinstance(stream_options.get("include_usage", False), bool)):
        raise ApiError(400, "stream_options may only be {\"include_usage\": true|false}", param="stream_options")
    if stream_options is not None and not stream:
        raise ApiError(400, "stream_options goes with stream: true", param="stream_options")
    return CompletionRequest(
        chat=chat, model=model, prompts=prompts, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        n=n, seed=_optional_int(body, "seed", None), stop=_stop(body.get("stop")),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        stream=stream, include_usage=bool((stream_options or {}).get("include_usage", False)))


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _check_names(body: dict, known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                       code="unknown_parameter")


def _unsupported(body: dict, harmless: dict) -> None:
    """A parameter with a value other than its harmless one (absent, None or the value given) is refused."""
    for name, value in harmless.items():
        if name in body and body[name] is not None and body[name] != value:
            raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")


def _messages(messages: object) -> tuple:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"messages[{index}] needs a role among {', '.join(ROLES)}", param=f"messages[{index}].role")
        checked.append(("system" if message["role"] == "developer" else message["role"],
                        _content(message.get("content"), index)))
    return tuple(checked)


def _content(content: object, index: int) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(part, dict) and part.get("type") == "text"
                                                     and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts (no images or audio)",
                   param=f"messages[{index}].content")


def _prompts(prompt: object) -> tuple:
    if isinstance(prompt, str):
        return (prompt,)
    if isinstance(prompt, list) and prompt and all(_is_token(item) for item in prompt):
        return (tuple(prompt),)
    if isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
        return tuple(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(item, list) and item and all(map(_is_token, item))
                                                   for item in prompt):
        return tuple(tuple(item) for item in prompt)
    raise ApiError(400, "prompt must be a string, a list of strings, token ids, or a list of token id lists",
                   param="prompt")


def _is_token(item: object) -> bool:
    return isinstance(item, int) and not isinstance(item, bool) and item >= 0


def _stop(stop: object) -> tuple[str, ...]:
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(item, str) and item for item in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    return tuple(stops)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", param=name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (low < value if open_low else low <= value) or value > high:
        bounds = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ApiError(400, f"{name} must be a number in {bounds}, got {value!r}", param=name)
    return float(value)


def _optional_int(body: dict, name: str, minimum: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        limit = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ApiError(400, f"{name} must be {limit}, got {value!r}", param=name)
    return value
