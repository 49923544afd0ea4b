import math

import pytest
import torch

from efedllm.compression.perplexity import read_text, windowed_perplexity


def test_uniform_model_has_the_vocabulary_size_as_perplexity():
    ids = torch.randint(0, 50, (2500,))
    result = windowed_perplexity(lambda batch: torch.zeros(*batch.shape, 50), ids, window=1024, max_tokens=2100)
    assert result.perplexity == pytest.approx(50.0)
    assert result.windows == 3 and result.predicted_tokens == 1023 + 1023 + 51


def test_perfect_model_has_perplexity_one_and_windows_are_independent():
    ids = torch.arange(40) % 7
    seen = []

    def logits_of(batch):
        seen.append(batch.shape[1])
        logits = torch.full((*batch.shape, 7), -1e4)
        logits[0, torch.arange(batch.shape[1]), (batch[0] + 1) % 7] = 0.0  # predicts the next id
        return logits

    result = windowed_perplexity(logits_of, ids, window=16, max_tokens=40)
    assert result.perplexity == pytest.approx(1.0) and seen == [16, 16, 8]
    assert result.mean_nll == pytest.approx(0.0, abs=1e-6) and math.isfinite(result.perplexity)


def test_bad_inputs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="1-D"):
        windowed_perplexity(lambda batch: batch, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2"):
        windowed_perplexity(lambda batch: batch, torch.zeros(1, dtype=torch.long))
    with pytest.raises(FileNotFoundError):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_text(tmp_path / "empty.txt")
