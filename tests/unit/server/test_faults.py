"""Each fault mode's effect on real (tiny, randomly initialised) Llama decoder layers, and parse errors."""

import copy

import pytest
import torch
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from efedllm.models.comparison import compare_outputs, token_metrics
from efedllm.server.faults import FaultMode, IdentityBlock, IntermittentFault, NoiseFault, SkipBlocksFault, parse_fault

CONFIG = LlamaConfig(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4, vocab_size=32
)


@pytest.fixture(scope="module")
def span():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(LlamaDecoderLayer(CONFIG, index) for index in range(4)).eval()
    hidden = torch.randn(2, 12, CONFIG.hidden_size)  # [batch, tokens, hidden]
    return layers, hidden


@torch.no_grad()
def run_span(layers, hidden):
    """Call the layers the way a server does (keyword arguments, no cache)."""
    positions = torch.arange(hidden.shape[1])[None].expand(hidden.shape[0], -1)
    embeddings = LlamaRotaryEmbedding(CONFIG)(hidden, positions)
    for layer in layers:
        hidden = layer(
            hidden, attention_mask=None, position_embeddings=embeddings, position_ids=positions, past_key_values=None, use_cache=False
        )
    return hidden


def faulty_output(spec, span, seed=0):
    layers, hidden = span
    fault = parse_fault(spec, seed=seed)
    faulty_layers = copy.deepcopy(layers)
    fault.prepare(faulty_layers)
    return fault, fault.corrupt(hidden, run_span(faulty_layers, hidden))


def test_none_is_honest(span):
    fault, output = faulty_output("none", span)
    assert torch.equal(output, run_span(*span))
    assert fault.delay_seconds() == 0.0 and type(fault) is FaultMode


def test_noise_has_the_documented_relative_size_and_is_reproducible(span):
    reference = run_span(*span)
    _, output = faulty_output("noise:0.05", span, seed=1)
    relative = ((output - reference).norm() / reference.norm()).item()
    assert relative == pytest.approx(0.05, rel=0.1)  # std = sigma * rms(whole output)
    _, same_seed = faulty_output("noise:0.05", span, seed=1)
    _, other_seed = faulty_output("noise:0.05", span, seed=2)
    assert torch.equal(output, same_seed) and not torch.equal(output, other_seed)


def test_noise_keeps_dtype():
    outputs = torch.randn(1, 4, 8, dtype=torch.bfloat16)
    noisy = NoiseFault(0.1).corrupt(outputs, outputs)
    assert noisy.dtype == torch.bfloat16 and not torch.equal(noisy, outputs)


@pytest.mark.parametrize("spec", ["zeros", "random", "skip-blocks", "skip-blocks:1", "wrong-model", "noise:0.1"])
def test_corrupting_modes_fail_a_probe(span, spec):
    comparison = compare_outputs(run_span(*span), faulty_output(spec, span)[1])
    assert not comparison.passed, comparison


def test_zeros_and_random_outputs(span):
    reference = run_span(*span)
    assert torch.count_nonzero(faulty_output("zeros", span)[1]) == 0
    random_output = faulty_output("random", span)[1]
    rms = lambda tensor: tensor.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(random_output) == pytest.approx(rms(reference), rel=0.05)
    cosine, _ = token_metrics(reference, random_output)
    assert cosine.abs().mean().item() < 0.3  # no signal left


def test_skip_blocks_swaps_layers_for_identity(span):
    layers, hidden = span
    fault = SkipBlocksFault()
    faulty_layers = copy.deepcopy(layers)
    fault.prepare(faulty_layers)
    assert fault.skipped == [0, 2]
    assert [isinstance(layer, IdentityBlock) for layer in faulty_layers] == [True, False, True, False]
    assert torch.equal(run_span(faulty_layers, hidden), run_span(torch.nn.ModuleList([layers[1], layers[3]]), hidden))
    one = parse_fault("skip-blocks:1", seed=3)
    one.prepare(copy.deepcopy(layers))
    assert len(one.skipped) == 1
    with pytest.raises(ValueError, match="only 4 blocks"):
        parse_fault("skip-blocks:5").prepare(copy.deepcopy(layers))


def test_wrong_model_redraws_weights_deterministically(span):
    layers, _ = span
    first, second = copy.deepcopy(layers), copy.deepcopy(layers)
    parse_fault("wrong-model", seed=4).prepare(first)
    parse_fault("wrong-model", seed=4).prepare(second)
    for original, redrawn, again in zip(layers.parameters(), first.parameters(), second.parameters()):
        assert redrawn.shape == original.shape and torch.equal(redrawn, again)
        assert not torch.equal(redrawn, original) or original.std() == 0
        assert redrawn.std().item() == pytest.approx(original.std().item(), rel=0.2, abs=1e-6)


def test_intermittent_corrupts_the_given_fraction_of_steps_strongly(span):
    reference = run_span(*span)
    fault = IntermittentFault(0.3, seed=5)
    outcomes = [compare_outputs(reference, fault.corrupt(span[1], reference)).passed for _ in range(1000)]
    assert fault.corrupted_steps == outcomes.count(False)  # every corrupted step fails its probe
    assert 0.25 < outcomes.count(False) / 1000 < 0.35
    always = parse_fault("intermittent:1")
    assert not any(compare_outputs(reference, always.corrupt(span[1], reference)).passed for _ in range(20))


def test_slow_delays_without_corrupting(span):
    fault, output = faulty_output("slow:250", span)
    assert fault.delay_seconds() == 0.25
    assert torch.equal(output, run_span(*span))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "non-empty"),
        ("gremlins", "unknown mode 'gremlins'"),
        ("noise", "needs an argument"),
        ("noise:abc", "SIGMA must be a number, got 'abc'"),
        ("noise:-0.1", "SIGMA must be > 0"),
        ("noise:0", "SIGMA must be > 0"),
        ("noise:nan", "SIGMA must be finite"),
        ("intermittent:0", r"P must be in \(0, 1\]"),
        ("intermittent:1.5", r"P must be in \(0, 1\]"),
        ("intermittent:often", "P must be a number"),
        ("slow:-5", "MS must be >= 0"),
        ("slow:", "needs an argument"),
        ("zeros:3", "takes no argument"),
        ("skip-blocks:0", "N must be a positive integer"),
        ("skip-blocks:two", "N must be a positive integer"),
    ],
)
def test_bad_specs_raise_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_fault(spec)


@pytest.mark.parametrize("spec", ["none", "noise:0.01", "zeros", "random", "skip-blocks", "skip-blocks:2", "wrong-model", "intermittent:0.5", "slow:100"])
def test_good_specs_round_trip(spec):
    assert parse_fault(spec).spec == spec
