"""Each fault mode's effect on real (tiny, randomly initialised) Llama decoder layers, and parse errors."""

import copy

import pytest
import torch
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from efedllm.models.comparison import compare_outputs, token_metrics
from efedllm.server.faults import (
    FAULT_HELP,
    FaultMode,
    FaultRules,
    IdentityBlock,
    IntermittentFault,
    NoiseFault,
    RuledFault,
    SkipBlocksFault,
    SlowFault,
    StepContext,
    ZerosFault,
    parse_fault,
)

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


# --- rules: MODE;RULE;RULE... (pure, hand-built StepContexts) ---


def context(**changes):
    """A plain decode step: the 6th of a 256-token, one-row session, arrived on a stream, no verdict seen."""
    fields = dict(step_index=5, position=40, tokens=1, rows=1, max_length=256, path="stream", verdicts_seen=False)
    return StepContext(**{**fields, **changes})


OUTPUTS = torch.randn(2, 3, 8)


@pytest.mark.parametrize(
    "spec, normalised",
    [
        ("noise:0.1;after=10;share=0.1", "noise:0.1;after=10;share=0.1"),
        (" noise:0.10 ; share=0.50 ;after=010 ", "noise:0.1;after=10;share=0.5"),  # canonical rule order
        ("zeros;push;verdict;batch;prefill=16;longer=512;after=0", "zeros;after=0;longer=512;prefill=16;batch;verdict;push"),
        ("random;share=1", "random;share=1"),
        ("intermittent:0.5;verdict", "intermittent:0.5;verdict"),
        ("zeros;after=1000000;prefill=+7", "zeros;after=1000000;prefill=7"),  # N stays an integer, never 1e+06
    ],
)
def test_rule_specs_parse_and_normalise(spec, normalised):
    fault = parse_fault(spec, seed=3)
    assert isinstance(fault, RuledFault) and fault.spec == normalised and fault.seed == 3
    assert parse_fault(normalised).spec == normalised
    assert fault.inner.spec == normalised.split(";")[0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("noise:0.1;sometimes", r"unknown rule 'sometimes'; known rules: after=N, longer=N, prefill=N, batch, verdict, push, share=P"),
        ("noise:0.1;", "unknown rule ''"),
        ("noise:0.1;after", "rule 'after' needs a value N"),
        ("noise:0.1;longer=", "rule 'longer' needs a value N"),
        ("noise:0.1;prefill=many", "rule prefill=N needs an integer N >= 0, got 'many'"),
        ("noise:0.1;after=1.5", "rule after=N needs an integer N >= 0, got '1.5'"),
        ("noise:0.1;after=-1", r"rule after=N needs an integer N >= 0, got '-1'"),
        ("noise:0.1;share", "rule 'share' needs a value P"),
        ("noise:0.1;share=0", r"share=P needs P in \(0, 1\]"),
        ("noise:0.1;share=1.5", r"share=P needs P in \(0, 1\]"),
        ("noise:0.1;share=-0.1", r"share=P needs P in \(0, 1\]"),
        ("noise:0.1;share=half", "share P must be a number, got 'half'"),
        ("noise:0.1;share=nan", "share P must be finite"),
        ("noise:0.1;after=1;after=2", "rule 'after' given twice"),
        ("noise:0.1;batch=3", "rule 'batch' takes no value"),
        ("noise:0.1;push=yes", "rule 'push' takes no value"),
        ("none;after=1", "rules need an output-corrupting mode"),
        ("slow:100;after=1", "rules need an output-corrupting mode"),
        ("announce:1e6;verdict", "rules need an output-corrupting mode"),
        ("skip-blocks;batch", "rules need an output-corrupting mode"),
        ("wrong-model;share=0.5", "rules need an output-corrupting mode"),
        ("noise:-1;after=1", "SIGMA must be > 0"),  # the mode is checked first
        ("gremlins;after=1", "unknown mode 'gremlins'"),
    ],
)
def test_bad_rules_raise_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_fault(spec)


def test_ruled_fault_only_wraps_output_corrupting_modes():
    with pytest.raises(ValueError, match="output-corrupting"):
        RuledFault(SlowFault(10), FaultRules(after=1))
    fault = RuledFault(ZerosFault(), FaultRules(batch=True, share=0.25), seed=1)
    assert fault.spec == "zeros;batch;share=0.25" and parse_fault(fault.spec).rules == fault.rules
    for bad in (dict(after=-1), dict(longer=-3), dict(share=0.0), dict(share=2.0)):
        with pytest.raises(ValueError, match="FaultRules needs N >= 0 and 0 < share <= 1"):
            FaultRules(**bad)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(step_index=-1), "step_index must be a non-negative int"),
        (dict(tokens=1.0), "tokens must be a non-negative int"),
        (dict(rows=True), "rows must be a non-negative int"),
        (dict(max_length=-5), "max_length must be a non-negative int"),
        (dict(position="3"), "position must be a non-negative int"),
        (dict(path="carrier-pigeon"), "path must be one of push, stream, unary"),
        (dict(verdicts_seen=1), "verdicts_seen must be a bool"),
    ],
)
def test_step_context_is_validated(changes, message):
    with pytest.raises(ValueError, match=message):
        context(**changes)


def test_step_context_is_frozen():
    with pytest.raises(AttributeError):
        context().step_index = 7


@pytest.mark.parametrize(
    "rule, ineligible, eligible",
    [
        ("after=10", dict(step_index=9), dict(step_index=10)),
        ("after=0", None, dict(step_index=0)),
        ("longer=256", dict(max_length=256), dict(max_length=257)),
        ("prefill=16", dict(tokens=16), dict(tokens=17)),
        ("batch", dict(rows=1), dict(rows=2)),
        ("verdict", dict(verdicts_seen=False), dict(verdicts_seen=True)),
        ("push", dict(path="stream"), dict(path="push")),
        ("push", dict(path="unary"), dict(path="push")),
    ],
)
def test_each_rule_decides_eligibility(rule, ineligible, eligible):
    fault = parse_fault(f"zeros;{rule}")
    if ineligible is not None:
        assert fault.corrupt(OUTPUTS, OUTPUTS, context(**ineligible)) is OUTPUTS
    assert torch.count_nonzero(fault.corrupt(OUTPUTS, OUTPUTS, context(**eligible))) == 0
    assert fault.eligible_steps == fault.corrupted_steps == 1


def test_all_rules_must_hold():
    fault = parse_fault("zeros;after=2;batch;push")
    assert fault.corrupt(OUTPUTS, OUTPUTS, context(step_index=2, rows=2, path="stream")) is OUTPUTS
    assert fault.corrupt(OUTPUTS, OUTPUTS, context(step_index=1, rows=2, path="push")) is OUTPUTS
    assert fault.corrupt(OUTPUTS, OUTPUTS, context(step_index=2, rows=1, path="push")) is OUTPUTS
    assert torch.count_nonzero(fault.corrupt(OUTPUTS, OUTPUTS, context(step_index=2, rows=2, path="push"))) == 0
    assert (fault.eligible_steps, fault.corrupted_steps) == (1, 1)


def test_without_a_context_a_ruled_fault_stays_honest():
    fault = parse_fault("noise:0.5;share=1")
    assert fault.corrupt(OUTPUTS, OUTPUTS) is OUTPUTS and fault.corrupt(OUTPUTS, OUTPUTS, None) is OUTPUTS
    assert (fault.eligible_steps, fault.corrupted_steps) == (0, 0)


def test_share_corrupts_about_that_share_of_eligible_steps_reproducibly():
    def run(seed):
        fault = parse_fault("noise:0.5;after=3;share=0.1", seed=seed)
        changed = [not torch.equal(fault.corrupt(OUTPUTS, OUTPUTS, context(step_index=index)), OUTPUTS) for index in range(2003)]
        return fault, changed

    fault, changed = run(seed=11)
    assert fault.eligible_steps == 2000 and not any(changed[:3])  # steps 0..2 are before after=3
    assert fault.corrupted_steps == changed.count(True) and 130 <= fault.corrupted_steps <= 270
    assert run(seed=11)[1] == changed and run(seed=12)[1] != changed


def test_eligible_steps_change_outputs_and_ineligible_ones_do_not():
    for spec in ("noise:0.1", "zeros", "random", "intermittent:1"):
        fault = parse_fault(f"{spec};longer=1024", seed=2)
        assert fault.corrupt(OUTPUTS, OUTPUTS, context(max_length=1024)) is OUTPUTS
        corrupted = fault.corrupt(OUTPUTS, OUTPUTS, context(max_length=4096))
        assert corrupted.shape == OUTPUTS.shape and not torch.equal(corrupted, OUTPUTS)
        assert (fault.eligible_steps, fault.corrupted_steps) == (1, 1)


def test_ruled_fault_delegates_the_other_hooks(span):
    class Inner(NoiseFault):
        prepared = None

        def prepare(self, layers):
            self.prepared = layers

        def delay_seconds(self):
            return 0.125

        def announced_throughput(self, measured):
            return measured * 3

    inner = Inner(0.1)
    fault = RuledFault(inner, FaultRules(verdict=True))
    layers = copy.deepcopy(span[0])
    fault.prepare(layers)
    assert inner.prepared is layers
    assert fault.delay_seconds() == 0.125 and fault.announced_throughput(10.0) == 30.0
    plain = parse_fault("noise:0.1;verdict")
    assert plain.delay_seconds() == 0.0 and plain.announced_throughput(42.0) == 42.0


@pytest.mark.parametrize("spec", ["none", "noise:0.01", "zeros", "random", "skip-blocks", "wrong-model", "intermittent:0.5", "slow:100", "announce:5"])
def test_existing_modes_ignore_the_context(span, spec):
    layers, hidden = span
    with_context, without_context = parse_fault(spec, seed=9), parse_fault(spec, seed=9)
    assert not isinstance(with_context, RuledFault)
    reference = run_span(layers, hidden)
    for index in range(5):
        step = context(step_index=index, tokens=hidden.shape[1], rows=hidden.shape[0], path="push", verdicts_seen=True)
        assert torch.equal(with_context.corrupt(hidden, reference, step), without_context.corrupt(hidden, reference))
    assert with_context.announced_throughput(7.0) == without_context.announced_throughput(7.0)


def test_help_and_errors_mention_the_rules():
    assert "MODE;RULE" in FAULT_HELP and "share=P" in FAULT_HELP and "noise:SIGMA" in FAULT_HELP
    with pytest.raises(ValueError, match=r"known modes: .*rules after=N"):
        parse_fault("gremlins")
