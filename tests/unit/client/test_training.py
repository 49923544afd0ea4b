"""Fine-tuning through spans (client/training.py, models/adapters.py): losses and gradients through three spans
equal transformers + peft in one process (LoRA, prompt tuning) and one span (deep prompt tuning); bad inputs are
named; a few optimiser steps lower the loss."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from efedllm.client.training import LocalSpanRunner, TrainableCausalLM
from efedllm.common.spans import parse_spans
from efedllm.models.adapters import AdapterInputError, AdapterSpec, TrainableSpan, init_adapters
from efedllm.models.span import load_span

MODEL = "smollm2-135m"
TEXT = ["The quick brown fox jumps over the lazy dog near the river bank today.",
        "A lighthouse keeper counts the ships that pass in the night, one by one."]


@pytest.fixture(scope="module")
def three_spans():
    return [load_span(MODEL, span.start, span.end) for span in parse_spans("0:10,10:20,20:30")]


@pytest.fixture(scope="module")
def batch(client_parts):
    rows = [client_parts.tokenizer(text)["input_ids"][:14] for text in TEXT]
    return torch.tensor(rows)  # [2, 14]


def build(client_parts, span_models, spec, seed: int = 0) -> TrainableCausalLM:
    trainables = [TrainableSpan(span_model, spec) for span_model in span_models]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for trainable in trainables:
        tensors.update(init_adapters(trainable.adapter_shapes(), spec, generator))
    for name in tensors:  # B = 0 would leave A's gradients zero: a test must see both
        if name.endswith("lora_B"):
            tensors[name] = torch.randn(tensors[name].shape, generator=generator) * 0.05
    return TrainableCausalLM(client_parts, [LocalSpanRunner(t) for t in trainables], spec, tensors,
                             torch.Generator().manual_seed(seed + 1))


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def relative_error(left: torch.Tensor, right: torch.Tensor) -> float:
    return float((left - right).norm() / right.norm().clamp_min(1e-12))


def hf_lora_reference(reference_model, spec: AdapterSpec, tensors: dict[str, torch.Tensor]):
    """transformers' model with peft's LoRA layers holding the same tensors."""
    model = copy.deepcopy(reference_model)
    inject_adapter_in_model(LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                                       lora_dropout=0.0), model)
    model.requires_grad_(False)
    parameters = dict(model.named_parameters())
    for name, tensor in tensors.items():
        _, block, rest = name.split(".", 2)
        parameter = parameters[f"model.layers.{block}.{rest}.default.weight"]
        parameter.data.copy_(tensor)
        parameter.requires_grad_(True)
    return model, parameters


def test_lora_through_three_spans_equals_transformers_with_peft(client_parts, three_spans, reference_model, batch):
    spec = AdapterSpec("lora", rank=4, alpha=8.0)
    model = build(client_parts, three_spans, spec)
    output = model(batch, labels=batch)
    output.loss.backward()
    ours = gradients(model)
    assert len(ours) == 30 * 4 * 2  # A and B of q, k, v, o in every block

    reference, parameters = hf_lora_reference(reference_model, spec, model.adapter_tensors())
    expected = reference(input_ids=batch, labels=batch)
    expected.loss.backward()
    assert abs(output.loss.item() - expected.loss.item()) <= 1e-4 * abs(expected.loss.item())
    worst = max(relative_error(ours[f"adapters.{name.replace('.', '__')}"],
                               parameters[f"model.layers.{name.split('.', 2)[1]}.{name.split('.', 2)[2]}.default.weight"].grad)
                for name in model.adapter_tensors())
    assert worst <= 1e-4


def test_prompt_tuning_equals_transformers_with_prepended_embeddings(client_parts, three_spans, reference_model, batch):
    spec = AdapterSpec("ptune", prompts=5)
    model = build(client_parts, three_spans, spec)
    output = model(batch, labels=batch)
    output.loss.backward()

    prompts = model.prompts.detach().clone().requires_grad_(True)
    embeds = torch.cat([prompts.unsqueeze(0).expand(2, -1, -1), reference_model.get_input_embeddings()(batch)], dim=1)
    labels = torch.cat([torch.full((2, 6), -100), batch[:, 1:]], dim=1)  # the first token is not predicted (as ours)
    expected = reference_model(inputs_embeds=embeds, labels=labels)
    expected.loss.backward()
    assert abs(output.loss.item() - expected.loss.item()) <= 1e-4 * abs(expected.loss.item())
    assert relative_error(model.prompts.grad, prompts.grad) <= 1e-4


def test_deep_prompt_tuning_through_three_spans_equals_one_span(client_parts, three_spans, full_span, batch):
    spec = AdapterSpec("deep-ptune", prompts=3)
    split, whole = build(client_parts, three_spans, spec), build(client_parts, [full_span], spec)
    assert set(whole.adapter_tensors()) == set(split.adapter_tensors())  # blocks.0.prompts .. blocks.29.prompts, prompts
    losses = []
    for model in (split, whole):
        output = model(batch, labels=batch)
        output.loss.backward()
        losses.append(output.loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[1])
    split_grads, whole_grads = gradients(split), gradients(whole)
    assert max(relative_error(split_grads[name], whole_grads[name]) for name in whole_grads) <= 1e-4
    assert split_grads["adapters.blocks__29__prompts"].abs().sum() > 0  # the last block's prompts are trained too


def test_accumulation_and_clipping_behave_as_locally(client_parts, three_spans, batch):
    """Two half-batches accumulated give the whole batch's gradients (mean loss halves)."""
    spec = AdapterSpec("lora", rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    whole, halves = build(client_parts, three_spans, spec), build(client_parts, three_spans, spec)
    whole(batch, labels=batch).loss.backward()
    for row in range(2):
        (halves(batch[row:row + 1], labels=batch[row:row + 1]).loss / 2).backward()
    worst = max(relative_error(a.grad, b.grad) for a, b in zip(halves.parameters(), whole.parameters()))
    assert worst <= 1e-4
    norm = torch.nn.utils.clip_grad_norm_(whole.parameters(), 1e-3)
    assert norm > 1e-3 and abs(float(torch.cat([p.grad.flatten() for p in whole.parameters()]).norm()) - 1e-3) < 1e-6


def test_a_few_adam_steps_lower_the_loss(client_parts, three_spans, batch):
    model = build(client_parts, three_spans, AdapterSpec("lora", rank=4, alpha=8.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert sum(parameter.numel() for parameter in model.parameters()) < 1_000_000  # adapters only, no base weight


def test_bad_training_inputs_are_named(three_spans):
    trainable = TrainableSpan(three_spans[0], AdapterSpec("lora", rank=2, alpha=4.0, targets=("q_proj",)))
    tensors = init_adapters(trainable.adapter_shapes(), trainable.spec, torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 4, 576)
    with pytest.raises(AdapterInputError, match="hidden states must be"):
        trainable.forward(torch.randn(1, 4, 5), tensors)
    with pytest.raises(AdapterInputError, match=r"unknown \['blocks.10"):
        trainable.forward(hidden, {**tensors, "blocks.10.self_attn.q_proj.lora_A": torch.zeros(2, 576)})
    wrong = dict(tensors, **{"blocks.0.self_attn.q_proj.lora_A": torch.zeros(3, 576)})
    with pytest.raises(AdapterInputError, match=r"blocks.0.self_attn.q_proj.lora_A must be \(2, 576\)"):
        trainable.forward(hidden, wrong)
    with pytest.raises(AdapterInputError, match="output gradients hold NaN"):
        trainable.backward(hidden, tensors, torch.full((1, 4, 576), float("nan")))
    with pytest.raises(ValueError, match="rank >= 1"):
        AdapterSpec("lora", rank=0)
    with pytest.raises(ValueError, match="method must be one of"):
        AdapterSpec("full")
