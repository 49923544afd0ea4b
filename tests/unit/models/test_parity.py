"""A model split into spans computes exactly what the whole model computes."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch
from transformers import GenerationConfig as TransformersGenerationConfig

from efedllm.client.local import LocalModelForCausalLM
from efedllm.client.sampling import GenerationConfig
from efedllm.common.spans import Span, parse_spans
from efedllm.models.span import load_span

PROMPTS = [
    ("What is the capital of France?", True),
    ("Write a haiku about the sea.", True),
    ("The history of the Roman Empire", False),
]
# 32 greedy tokens whatever they are: neither side stops at (or suppresses) end-of-sequence.
NO_EOS_GREEDY = TransformersGenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2)
SPLITS = {
    "1 span": [Span(0, 30)],
    "3 spans": parse_spans("0:10,10:20,20:30"),
    "30 spans": [Span(block, block + 1) for block in range(30)],
}


@contextmanager
def eos_disabled(model):
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


@pytest.fixture(scope="module")
def pipelines(client_parts, full_span):
    built = {}
    for name, spans in SPLITS.items():
        models = [full_span] if spans == [Span(0, 30)] else [load_span("smollm2-135m", s.start, s.end) for s in spans]
        built[name] = LocalModelForCausalLM(client_parts, models)
    return built


@pytest.fixture(scope="module")
def expected_tokens(pipelines, reference_model):
    """transformers' own greedy continuation of each prompt (computed once)."""
    expected = {}
    for prompt, chat in PROMPTS:
        input_ids = pipelines["1 span"].encode_prompt(prompt, chat=chat)
        with torch.no_grad(), eos_disabled(reference_model):
            tokens = reference_model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), generation_config=NO_EOS_GREEDY
            )[0, input_ids.shape[1]:].tolist()
        assert len(tokens) == 32
        expected[prompt] = (input_ids, tokens)
    return expected


@pytest.mark.parametrize("split", list(SPLITS))
def test_greedy_tokens_match_transformers_generate(pipelines, expected_tokens, split):
    config = GenerationConfig(max_new_tokens=32, greedy=True, stop_on_eos=False)
    for prompt, (input_ids, expected) in expected_tokens.items():
        assert pipelines[split].generate(input_ids, config).token_ids == expected, (split, prompt)


def test_logits_match_the_unsplit_model(pipelines, reference_model, client_parts):
    input_ids = pipelines["3 spans"].encode_prompt("Explain photosynthesis in one sentence.")
    with torch.no_grad():
        expected = reference_model(input_ids).logits
    for name, pipeline in pipelines.items():
        with pipeline.inference_session(max_length=input_ids.shape[1]) as session:
            logits = client_parts.logits(session.step(client_parts.embed(input_ids)))
        assert (logits - expected).abs().max().item() < 1e-4, name


def test_decode_steps_match_one_prefill(pipelines, client_parts):
    pipeline = pipelines["3 spans"]
    input_ids = pipeline.encode_prompt("Count to five:", chat=False)
    with pipeline.inference_session(max_length=32) as session:
        whole = session.step(client_parts.embed(input_ids))
    with pipeline.inference_session(max_length=32) as session:
        pieces = [session.step(client_parts.embed(input_ids[:, :2]))]
        pieces += [session.step(client_parts.embed(input_ids[:, i:i + 1])) for i in range(2, input_ids.shape[1])]
    error = (torch.cat(pieces, dim=1) - whole).abs().max() / whole.abs().max()
    assert error < 1e-5, error


def test_concurrent_generations_share_the_lm_head_and_match_transformers(pipelines, expected_tokens):
    """Threads generating at once (their LM-head calls merged, client/coalesce.py) get transformers' tokens."""
    model, results = pipelines["3 spans"], {}
    config = GenerationConfig(max_new_tokens=32, greedy=True, stop_on_eos=False)

    def run(prompt: str) -> None:
        results[prompt] = model.generate(expected_tokens[prompt][0], config).token_ids

    calls_before = model.head.calls
    threads = [threading.Thread(target=run, args=(prompt,)) for prompt, _ in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert {prompt: results.get(prompt) for prompt, _ in PROMPTS} == {prompt: tokens for prompt, (_, tokens) in expected_tokens.items()}
    assert model.head.calls - calls_before == 3 * 32  # every token's logits went through the shared head
