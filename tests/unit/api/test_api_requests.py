"""OpenAI request bodies: what is accepted, what each refusal names, and how settings map to generation."""

from __future__ import annotations

import pytest

from efedllm.api.requests import ApiError, parse_chat_request, parse_completion_request
from efedllm.api.responses import chunk, usage_chunk, whole_completion

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refused(parse, body) -> ApiError:
    with pytest.raises(ApiError) as error:
        parse(body)
    assert error.value.status == 400
    assert set(error.value.body()["error"]) == {"message", "type", "param", "code"}
    return error.value


def test_openai_defaults_and_their_generation_config():
    request = parse_chat_request(CHAT)
    assert (request.temperature, request.top_p, request.n, request.stream, request.max_tokens) == (1.0, 1.0, 1, False, None)
    config = request.generation_config(0, 16)
    assert not config.greedy and config.top_k == 0 and config.temperature == 1.0 and config.max_new_tokens == 16


def test_temperature_zero_is_greedy_and_choices_get_their_own_seeds():
    request = parse_chat_request({**CHAT, "temperature": 0, "seed": 5, "n": 3, "stop": "\n",
                                  "presence_penalty": 0.5, "frequency_penalty": -1})
    configs = [request.generation_config(choice, 8) for choice in range(3)]
    assert all(config.greedy for config in configs) and [config.seed for config in configs] == [5, 6, 7]
    assert configs[0].stop_strings == ("\n",) and configs[0].presence_penalty == 0.5 and configs[0].frequency_penalty == -1


def test_message_contents_roles_and_parts():
    request = parse_chat_request({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert request.prompts == ((("system", "be brief"), ("user", "ab")),)


@pytest.mark.parametrize("change, param", [
    ({"model": None}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": "yes"}, "stream"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_chat_requests_name_the_parameter(change, param):
    assert refused(parse_chat_request, {**CHAT, **change}).param == param


def test_completion_prompts_of_every_form():
    assert parse_completion_request({"model": "m", "prompt": "x"}).prompts == ("x",)
    assert parse_completion_request({"model": "m", "prompt": ["x", "y"]}).prompts == ("x", "y")
    assert parse_completion_request({"model": "m", "prompt": [1, 2]}).prompts == ((1, 2),)
    assert parse_completion_request({"model": "m", "prompt": [[1], [2, 3]]}).prompts == ((1,), (2, 3))
    for prompt in (None, [], [1, "x"], [-1], [[]]):
        assert refused(parse_completion_request, {"model": "m", "prompt": prompt}).param == "prompt"
    assert refused(parse_completion_request, {"model": "m", "prompt": "x", "echo": True}).param == "echo"
    assert refused(parse_completion_request, {"model": "m", "prompt": "x", "best_of": 3}).param == "best_of"
    assert refused(parse_completion_request, {"model": "m", "prompt": "x", "messages": []}).param == "messages"


def test_a_body_that_is_not_an_object():
    assert refused(parse_chat_request, ["not", "an", "object"]).param is None


def test_response_objects():
    whole = whole_completion(True, "id", "m", ["a", "b"], ["stop", "length"], 5, 3)
    assert [choice["message"]["content"] for choice in whole["choices"]] == ["a", "b"]
    assert whole["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    first = chunk(True, "id", "m", 1, 0, role=True, with_usage_field=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    assert chunk(True, "id", "m", 1, 1, finish_reason="stop")["choices"][0] == {
        "index": 1, "delta": {}, "finish_reason": "stop", "logprobs": None}
    assert chunk(False, "id", "m", 1, 0, text="x")["choices"][0]["text"] == "x"
    assert usage_chunk(True, "id", "m", 1, 2, 3)["choices"] == []
