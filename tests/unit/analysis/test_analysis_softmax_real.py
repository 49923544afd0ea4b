"""Softmax verification on real attention scores of SmolLM2-135M (layer 3, eager attention)."""

import pytest
import torch

from efedllm.analysis import softmax_check as check

pytestmark = pytest.mark.slow  # loads the GGUF model (~30 s on 2 cores)


def test_real_scores_reproduce_the_models_probabilities(real_attention):
    scores, probs = real_attention  # [heads, T, T]
    torch.testing.assert_close(torch.softmax(scores.double(), dim=-1), probs.double(), rtol=0, atol=1e-6)


def test_decomposition_matches_torch_softmax_on_real_scores(real_attention):
    scores, _ = real_attention
    for config in (check.SoftmaxCheckConfig(), check.SoftmaxCheckConfig(base=2, digits=24, fraction_bits=18)):
        error = (check.lookup_softmax(scores, config) - torch.softmax(scores.double(), dim=-1)).abs().max().item()
        assert error <= check.derive_error_bound(config, scores.shape[-1]).absolute


def test_honest_model_passes_and_tampering_is_caught(real_attention):
    scores, probs = real_attention
    with check.SoftmaxVerifier(check.SoftmaxCheckConfig(), workers=2) as verifier:
        assert verifier.verify(scores, probs).passed
        assert torch.equal(verifier.probabilities(scores), check.lookup_softmax(scores))
        generator = torch.Generator().manual_seed(0)
        tampered = {
            "permuted rows": check.tamper_permute_rows(probs, generator),
            "temperature 1.1": check.tamper_temperature(scores, 1.1),
            "dropped key 0": check.tamper_drop_key(probs, 0),
            "dropped most attended key": check.tamper_drop_key(probs, int(probs[:, -1].argmax(dim=-1)[0])),
        }
        for name, tampered_probs in tampered.items():
            assert not verifier.verify(scores, tampered_probs).passed, name
