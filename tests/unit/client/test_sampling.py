from __future__ import annotations

import pytest
import torch

from efedllm.client.sampling import (
    GenerationConfig, apply_openai_penalties, apply_repetition_penalty, choose_next_token, filter_top_k_top_p, find_stop,
    held_back_length,
)


def test_greedy_takes_argmax():
    logits = torch.tensor([0.1, 3.0, 2.0])
    assert choose_next_token(logits, torch.tensor([]), GenerationConfig(greedy=True), None) == 1


def test_repetition_penalty_as_transformers():
    logits = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([0, 1]), 2.0)
    assert logits.tolist() == [1.0, -4.0, 1.0]


def test_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.5)).tolist() == [False, True, True, True]


def test_seeded_sampling_repeats():
    logits = torch.randn(100)
    config = GenerationConfig(seed=3, top_k=0, top_p=1.0, temperature=1.0)
    draws = [[choose_next_token(logits, torch.tensor([]), config, g) for _ in range(5)]
             for g in (torch.Generator().manual_seed(3), torch.Generator().manual_seed(3))]
    assert draws[0] == draws[1]


def test_stop_strings_and_validation():
    assert find_stop("hello world. Bye", ("world", "Bye")) == 6
    assert find_stop("hello", ("x",)) is None
    for bad in ({"max_new_tokens": 0}, {"temperature": 0}, {"top_p": 1.5}, {"top_k": -1}, {"stop_strings": ("",)}):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)


def test_openai_penalties_count_generated_tokens_only():
    logits = torch.zeros(5)
    penalised = apply_openai_penalties(logits, [1, 1, 3], presence=0.5, frequency=0.25)
    assert penalised.tolist() == [0.0, -1.0, 0.0, -0.75, 0.0]
    assert apply_openai_penalties(logits, [], 1.0, 1.0) is logits
    with pytest.raises(ValueError, match="presence_penalty"):
        GenerationConfig(presence_penalty=2.5)


def test_the_start_of_a_stop_string_is_held_back():
    assert held_back_length("Hello wor", ("world",)) == 3
    assert held_back_length("Hello", ("world",)) == 0
    assert held_back_length("ab\n", ("\n\n", "xyz")) == 1
    assert held_back_length("abc", ()) == 0
