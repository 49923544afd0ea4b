"""The OpenAI-compatible API over a real 3-server swarm, driven by the official ``openai`` package (sync and async)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid

import httpx
import openai
import pytest

from efedllm.api.app import ApiServer
from efedllm.api.config import ApiConfig
from efedllm.common.spans import Span
from efedllm.protocol.messages import OpenSessionRequest
from efedllm.protocol.service import HopFailure

MODEL = "smollm2-135m"
PROMPT = "Name three colours of the rainbow."
pytestmark = pytest.mark.swarm


@pytest.fixture
def client(api):
    return openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, content: str, **settings):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **settings)


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample of a Prometheus exposition (0 when absent)."""
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_streamed_chat_equals_cli_greedy_generate(api, client, swarm):
    cli = subprocess.run([sys.executable, "-m", "efedllm.cli", "generate", PROMPT, "--greedy", "--max-new-tokens", "24",
                          "--json", "--initial-peers", *swarm.initial_peers], capture_output=True, text=True, timeout=240)
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout.strip().splitlines()[-1])

    chunks = list(chat(client, PROMPT, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == expected["text"] and streamed
    finals = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finals == ["length" if expected["new_tokens"] == 24 else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    eos = 0 if finals == ["length"] else 1  # the EOS token that ended it is generated too
    assert chunks[-1].usage.completion_tokens == expected["new_tokens"] + eos
    assert chunks[-1].usage.prompt_tokens == api.service.model.encode_prompt(PROMPT).shape[1]

    whole = chat(client, PROMPT, max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == expected["text"]
    assert whole.choices[0].finish_reason == finals[0]
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_concurrent_async_requests_are_served_together(api, client):
    prompts = ["Say hello.", "What is 2 plus 2?", "Name a fruit.", "What colour is the sky?", "Count to five.",
               "Name a planet."]
    alone = [chat(client, prompt, max_tokens=12, temperature=0).choices[0].message.content for prompt in prompts]
    before = httpx.get(api.url + "/metrics").text

    async def together():
        async_client = openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(index: int, prompt: str) -> str:
            messages = [{"role": "user", "content": prompt}]
            if index % 2:
                stream = await async_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                                    temperature=0, stream=True)
                return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
            reply = await async_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
            return reply.choices[0].message.content

        try:
            return await asyncio.gather(*(one(index, prompt) for index, prompt in enumerate(prompts)))
        finally:
            await async_client.close()

    assert asyncio.run(together()) == alone
    after = httpx.get(api.url + "/metrics").text
    steps = metric(after, "efedllm_api_step_rows_count") - metric(before, "efedllm_api_step_rows_count")
    single_row_steps = (metric(after, "efedllm_api_step_rows_bucket", '{le="1.0"}')
                        - metric(before, "efedllm_api_step_rows_bucket", '{le="1.0"}'))
    assert steps > 0 and single_row_steps < steps  # some steps carried several requests' rows at once


def test_completions_with_n_seed_stop_and_length(client):
    settings = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, n=2, seed=11, temperature=0.9)
    first, second = client.completions.create(**settings), client.completions.create(**settings)
    assert [choice.index for choice in first.choices] == [0, 1]
    assert [choice.text for choice in first.choices] == [choice.text for choice in second.choices]
    assert 2 <= first.usage.completion_tokens == second.usage.completion_tokens <= 16
    assert first.choices[0].text != first.choices[1].text  # choice j samples with seed + j

    short = chat(client, PROMPT, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3

    full = chat(client, PROMPT, max_tokens=24, temperature=0).choices[0].message.content
    words = full.split(" ")
    assert len(words) > 3
    stop = " " + words[2]
    cut = full[:full.find(stop)]
    stopped = chat(client, PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == cut and stopped.choices[0].finish_reason == "stop"
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in chat(client, PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True))
    assert streamed == cut  # the stop string's start was held back, never streamed

    penalised = chat(client, PROMPT, max_tokens=8, temperature=0, presence_penalty=1.5, frequency_penalty=1.0)
    assert penalised.choices[0].message.content


def test_errors_come_in_openai_shape(api, client):
    bad_json = httpx.post(api.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    assert bad_json.json()["error"]["code"] == "invalid_json"

    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as too_long:
        chat(client, "word " * 9000, max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"

    for settings, param in ((dict(logprobs=True), "logprobs"), (dict(temperature=5), "temperature"), (dict(n=99), "n"),
                            (dict(stop=["a", "b", "c", "d", "e"]), "stop")):
        with pytest.raises(openai.BadRequestError) as refused:
            chat(client, "hi", max_tokens=2, **settings)
        assert refused.value.param == param

    empty = httpx.post(api.url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"
    # the API still serves after all of that
    assert chat(client, "hi", max_tokens=2, temperature=0).choices[0].finish_reason in ("stop", "length")


def test_models_health_and_monitor_data(api, client):
    models = client.models.list().data
    assert [model.id for model in models] == [MODEL]
    assert models[0].model_extra["blocks_covered"] == models[0].model_extra["blocks_total"] == 30
    health = httpx.get(api.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    deadline = time.monotonic() + 30
    while True:  # the monitor's probes measure every server within a probe interval or two
        snapshot = httpx.get(api.url + "/api/swarm").json()
        if all(server["step_ms"] is not None and server["rtt_ms"] is not None for server in snapshot["servers"]):
            break
        assert time.monotonic() < deadline, snapshot
        time.sleep(1)
    assert [server["span"] for server in snapshot["servers"]] == [[0, 10], [10, 20], [20, 30]]
    assert snapshot["gaps"] == [] and all(len(peers) == 1 for peers in snapshot["blocks"])


def test_disconnect_cancels_generation_and_closes_server_sessions(api, swarm):
    ports = [server.ready()["metrics_port"] for server in swarm.servers]

    def open_sessions() -> float:
        return sum(metric(httpx.get(f"http://127.0.0.1:{port}/metrics").text, "efedllm_server_open_sessions")
                   for port in ports)

    baseline, settle = open_sessions(), time.monotonic() + 10
    while time.monotonic() < settle:  # earlier tests' sessions may still be closing in the background
        time.sleep(0.5)
        baseline, previous = open_sessions(), baseline
        if baseline == previous and not api.service.engine.stats().active_rows:
            break
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
            "stream": True}
    with httpx.stream("POST", api.url + "/v1/chat/completions", json=body, timeout=60) as response:
        data = during = 0
        for line in response.iter_lines():
            data += line.startswith("data:")
            if data == 3:
                during = open_sessions()
            if data >= 4:
                break  # httpx closes the connection here
    assert during >= baseline + 3  # one session on each server while it generated
    deadline = time.monotonic() + 20
    while api.service.engine.stats().active_rows or open_sessions() > baseline:
        assert time.monotonic() < deadline, "the generation went on, or its sessions stayed open, after the disconnect"
        time.sleep(0.2)
    assert api.service.engine.stats().tokens_total < 400


def test_server_metrics_count_steps_and_cache(swarm, client):
    port = swarm.servers[0].ready()["metrics_port"]
    before = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    chat(client, "hi", max_tokens=4, temperature=0)
    after = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert metric(after, "efedllm_server_steps_total") > metric(before, "efedllm_server_steps_total")
    assert metric(after, "efedllm_server_tokens_total") > metric(before, "efedllm_server_tokens_total")
    assert metric(after, "efedllm_server_step_seconds_count") > metric(before, "efedllm_server_step_seconds_count")
    assert metric(after, "efedllm_server_cache_budget_bytes") > 0


def test_api_key_is_required_when_set(swarm):
    server = ApiServer(ApiConfig(model=MODEL, initial_peers=tuple(swarm.initial_peers), port=0, api_key="s3cret",
                                 probe_interval=0)).start()
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        missing = httpx.get(server.url + "/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == MODEL
    finally:
        server.shutdown()


def test_a_whole_answer_is_cancelled_when_its_client_leaves(api):
    before = api.service.engine.tokens_total
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(api.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    deadline = time.monotonic() + 20
    while api.service.engine.stats().active_rows or api.service.engine.stats().opening_rows:
        assert time.monotonic() < deadline, "the generation went on after its client left"
        time.sleep(0.2)
    assert api.service.engine.tokens_total - before < 400


def test_server_metrics_count_refused_requests_by_reason(api, swarm):
    server = swarm.servers[0]
    port, peer = server.ready()["metrics_port"], server.ready()["peer_id"]
    labels = '{reason="invalid"}'
    before = metric(httpx.get(f"http://127.0.0.1:{port}/metrics").text, "efedllm_server_rejected_requests_total", labels)
    model = api.service.model
    request = OpenSessionRequest(uuid.uuid4().hex, Span(0, 10), 10**6, None, 1)  # longer than any server allows
    with pytest.raises(HopFailure, match="max_length"):
        model.run(model.stub(peer).open_session(request))
    after = metric(httpx.get(f"http://127.0.0.1:{port}/metrics").text, "efedllm_server_rejected_requests_total", labels)
    assert after == before + 1
