"""Batched generate on the local pipeline: ragged prompts, per-row stopping, rows equal to generating each alone."""

from __future__ import annotations

import pytest
import torch

from efedllm.client.batch_generation import prompt_rows
from efedllm.client.sampling import GenerationConfig

PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea, please, in English."]


def test_prompt_rows_undo_left_and_right_padding():
    input_ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0]])
    attention_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert [row.tolist() for row in prompt_rows(input_ids, attention_mask)] == [[[5, 6]], [[7, 8, 9]]]
    with pytest.raises(ValueError, match="no tokens"):
        prompt_rows(input_ids, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        prompt_rows(input_ids, torch.full((2, 4), 2))
    with pytest.raises(ValueError, match="shape"):
        prompt_rows(input_ids, torch.ones(2, 3))


def test_batched_rows_equal_each_prompt_alone_greedy_and_sampled(local_pipeline):
    for config in (GenerationConfig(max_new_tokens=12, greedy=True),
                   GenerationConfig(max_new_tokens=10, seed=3, temperature=0.9)):
        streamed: dict[int, str] = {}
        batch = local_pipeline.generate_batch(PROMPTS, config,
                                              on_text=lambda row, text: streamed.__setitem__(row, streamed.get(row, "") + text))
        for row, prompt in enumerate(PROMPTS):
            alone = local_pipeline.generate(local_pipeline.encode_prompt(prompt), config)
            assert batch[row].token_ids == alone.token_ids, (row, config)
            assert batch[row].text == alone.text == streamed[row]
            assert batch[row].extra["finish_reason"] in ("stop", "length")


def test_rows_stop_on_their_own_and_padded_input_ids_work(local_pipeline):
    config = GenerationConfig(max_new_tokens=16, greedy=True, stop_strings=("Paris",))
    rows = [local_pipeline.encode_prompt(prompt) for prompt in PROMPTS[:2]]
    width = max(row.shape[1] for row in rows)
    input_ids = torch.stack([torch.cat([torch.zeros(width - row.shape[1], dtype=torch.long), row[0]]) for row in rows])
    attention_mask = torch.stack([torch.cat([torch.zeros(width - row.shape[1]), torch.ones(row.shape[1])]) for row in rows])
    results = local_pipeline.generate_batch(input_ids, config, attention_mask=attention_mask.long())
    assert "Paris" not in results[0].text and results[0].extra["finish_reason"] == "stop"
    assert results[0].new_tokens < 16 and results[1].new_tokens == 16 and results[1].extra["finish_reason"] == "length"
    assert all(len(sessions) == 0 for sessions in local_pipeline.span_sessions)  # every row's sessions closed


def test_bad_prompts_are_refused(local_pipeline):
    with pytest.raises(ValueError, match="no prompts"):
        local_pipeline.generate_batch([])
    with pytest.raises(ValueError, match="prompt 1"):
        local_pipeline.generate_batch([torch.tensor([[1, 2]]), torch.tensor([3])])
