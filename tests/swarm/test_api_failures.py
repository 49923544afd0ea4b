"""The API when the swarm cannot serve: blocks missing (a 503 naming them) and a server dying mid-stream
(the stream ends with an error event, then ``[DONE]``). A swarm of its own: it loses a server."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from efedllm.api.app import ApiServer
from efedllm.api.config import ApiConfig
from efedllm.client.config import RemoteClientConfig
from efedllm.server.swarm import LocalSwarm

MODEL = "smollm2-135m"
pytestmark = [pytest.mark.swarm, pytest.mark.slow]
QUICK_FAILOVER = RemoteClientConfig(max_retries=1, retry_delay=0.1, max_retry_delay=0.2, discovery_timeout=3.0,
                                    request_timeout=10.0, server_view_max_age=0.0)


def test_missing_blocks_and_a_server_dying_mid_stream():
    with LocalSwarm(MODEL) as swarm:
        swarm.start_bootstrap()
        swarm.start_server("0:10", extra=["--no-rebalance"])
        swarm.wait_until_online(1)
        api = ApiServer(ApiConfig(model=MODEL, initial_peers=tuple(swarm.initial_peers), port=0, probe_interval=0,
                                  client=QUICK_FAILOVER)).start()
        try:
            client = openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            with pytest.raises(openai.APIStatusError) as missing:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert missing.value.status_code == 503 and "10-29" in missing.value.message
            assert missing.value.code == "blocks_missing"
            health = httpx.get(api.url + "/health")
            assert health.status_code == 503 and health.json()["blocks_covered"] == 10
            assert httpx.get(api.url + "/api/swarm").json()["gaps_text"] == "10-29"

            second = swarm.start_server("10:30", extra=["--no-rebalance"])
            swarm.wait_until_online(2)
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                    "max_tokens": 300, "stream": True}
            events = []
            with httpx.stream("POST", api.url + "/v1/chat/completions", json=body, timeout=120) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
                        if len(events) == 3:
                            swarm.kill(second)
            assert events[-1] == "[DONE]"
            failure = json.loads(events[-2])
            assert set(failure["error"]) == {"message", "type", "param", "code"}
            assert all("choices" in json.loads(event) for event in events[:-2])

            deadline = time.monotonic() + 30
            while True:  # the dead server is avoided: its blocks are missing again
                try:
                    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
                except openai.APIStatusError as error:
                    if error.status_code == 503 and "10-29" in error.message:
                        break
                assert time.monotonic() < deadline
                time.sleep(1)
        finally:
            api.shutdown()
