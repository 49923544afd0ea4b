"""Batching across sessions through a real 3-server swarm: a batch of ragged prompts, every row's tokens
equal to the local pipeline's for that prompt alone."""

from __future__ import annotations

import pytest

from efedllm.client.sampling import GenerationConfig

pytestmark = pytest.mark.swarm
GREEDY = GenerationConfig(max_new_tokens=16, greedy=True, stop_on_eos=False)
PROMPTS = ["Say hello in French.", "What is two plus two?", "Name a large ocean.",
           "Write one sentence about a lighthouse keeper who loves the sea.", "Hi", "List four planets of the solar system."]


def test_a_batch_through_the_swarm_equals_each_prompt_alone(remote_model, local_pipeline):
    expected = [local_pipeline.generate(local_pipeline.encode_prompt(prompt), GREEDY).token_ids for prompt in PROMPTS]
    results = remote_model.generate_batch(PROMPTS, GREEDY)
    assert [result.token_ids for result in results] == expected
    stopping = GenerationConfig(max_new_tokens=16, greedy=True, stop_strings=(" ",))
    short = remote_model.generate_batch(PROMPTS[:3], stopping)
    assert all(result.extra["finish_reason"] == "stop" for result in short)
    assert remote_model.generate_batch(PROMPTS[:1], GREEDY)[0].token_ids == expected[0]  # closed rows freed the servers
