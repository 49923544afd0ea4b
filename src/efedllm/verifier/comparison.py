"""Does a probe pass? Comparing a server's hidden states with the verifier's own reference.

Both metrics are computed **per token** (each row of the hidden dimension) and the worst token
decides. Whole-tensor metrics are useless on Llama-style models: the first position of every
sequence is an attention sink whose hidden state is ~100x larger than the others (SmolLM2-135M
after block 19: norm ~20,000 against a median of ~218), so a whole-tensor cosine or relative
error only sees that one token and misses a server that skips a block (measured: whole-tensor
relative L2 of a skipped block is 0.02, below an honest bfloat16 server's per-token worst).

A probe passes when, for every token ``t``, ``cos(candidate_t, reference_t) >= min_cosine`` and
``||candidate_t - reference_t|| / ||reference_t|| <= max_relative_l2``.

Default tolerances (:data:`DEFAULT_TOLERANCES`), measured on SmolLM2-135M-Instruct, blocks
10..19, 16 WikiText-2 test paragraphs of 128 tokens, reference in float32 (see
``tests/unit/verifier/test_real_model_tolerances.py``, which re-measures them):

==========================  ====================  =====================
run                         worst 1 - cosine      worst relative L2
==========================  ====================  =====================
honest bfloat16 server      1.9e-4                0.020
honest float16 server       4.1e-6                0.0027
fault ``noise:0.01``        >= 5.1e-3             >= 0.10
fault ``skip-blocks``       >= 0.11               >= 0.48
fault ``wrong-model``       >= 0.6                >= 1.0
==========================  ====================  =====================

``min_cosine = 0.998`` sits 10x above the honest bfloat16 worst and 2.5x below the weakest
fault; ``max_relative_l2 = 0.05`` is 2.5x the honest bfloat16 worst and half of ``noise:0.01``.
Each criterion alone separates every measured honest run from every measured fault.

Limit, measured and stated plainly: noise whose scale is set **per token** at 1% of that token's
RMS gives a worst relative L2 of only 0.011 and 1 - cosine of 6e-5, *below* what an honest
bfloat16 server produces (0.020, 1.9e-4). No output-comparison tolerance can catch it without
deactivating honest bfloat16 servers; per-token noise becomes detectable from about 3-5%.
``noise:SIGMA`` in :mod:`~efedllm.verifier.faults` is relative to the RMS of the whole output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

_NORM_FLOOR = 1e-12


@dataclass(frozen=True)
class Tolerances:
    """How far a probe's output may be from the reference and still pass (see the module docstring).

    A token is *off* when its cosine is below ``min_cosine`` or its relative L2 error above
    ``max_relative_l2``. A probe passes when at most ``floor(max_off_fraction * tokens)`` tokens
    are off and no token's relative L2 error exceeds ``hard_max_relative_l2``.
    """

    min_cosine: float = 0.9995
    max_relative_l2: float = 0.03
    max_off_fraction: float = 0.02
    hard_max_relative_l2: float = 0.3

    def __post_init__(self) -> None:
        _check_range("min_cosine", self.min_cosine, -1.0, 1.0)
        _check_range("max_relative_l2", self.max_relative_l2, 0.0, math.inf, low_open=True)
        _check_range("max_off_fraction", self.max_off_fraction, 0.0, 1.0)
        _check_range("hard_max_relative_l2", self.hard_max_relative_l2, self.max_relative_l2, math.inf)


def _check_range(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    number_ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number_ok or value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"tolerance {name} must be a finite number in {bracket}{low:g}, {high:g}], got {value!r}")


DEFAULT_TOLERANCES = Tolerances()


@dataclass(frozen=True)
class ProbeComparison:
    """Metrics of one probe and whether it passed (``reason`` says why not).

    ``min_cosine`` / ``max_relative_l2`` are the worst token's; ``off_fraction`` is the share of
    tokens outside the per-token tolerances.
    """

    min_cosine: float
    max_relative_l2: float
    off_fraction: float
    passed: bool
    reason: str = ""


def token_metrics(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cosine similarity and relative L2 error, each of shape ``[tokens]``.

    Both tensors are ``[..., hidden]``; leading dimensions are flattened into tokens. Computed in
    float64 so the metric itself adds no rounding worth mentioning.
    """
    reference = reference.detach().reshape(-1, reference.shape[-1]).to(torch.float64)  # [T, H]
    candidate = candidate.detach().reshape(-1, candidate.shape[-1]).to(torch.float64)  # [T, H]
    reference_norm = reference.norm(dim=-1)  # [T]
    candidate_norm = candidate.norm(dim=-1)  # [T]
    dot = (reference * candidate).sum(dim=-1)  # [T]
    # A zero vector has no direction: its cosine with anything is 0, so an all-zeros answer fails.
    denominator = reference_norm * candidate_norm
    cosine = torch.where(denominator > 0, dot / denominator.clamp_min(_NORM_FLOOR), torch.zeros_like(dot))
    relative = (candidate - reference).norm(dim=-1) / reference_norm.clamp_min(_NORM_FLOOR)  # [T]
    return cosine, relative


def _failed(reason: str) -> ProbeComparison:
    return ProbeComparison(-1.0, math.inf, 1.0, False, reason)


def compare_outputs(
    reference: torch.Tensor, candidate: torch.Tensor, tolerances: Tolerances = DEFAULT_TOLERANCES
) -> ProbeComparison:
    """Judge one probe. A malformed candidate (wrong shape, NaN/inf) fails; a bad reference raises."""
    if not isinstance(reference, torch.Tensor) or reference.ndim < 1 or reference.numel() == 0:
        raise ValueError("reference must be a non-empty tensor of shape [..., hidden]")
    if not reference.is_floating_point() or not torch.isfinite(reference).all():
        raise ValueError("reference must be a floating-point tensor without NaN or infinite values")
    if not isinstance(candidate, torch.Tensor):
        return _failed(f"candidate is a {type(candidate).__name__}, not a tensor")
    if candidate.shape != reference.shape:
        return _failed(f"candidate shape {tuple(candidate.shape)} != reference {tuple(reference.shape)}")
    if not candidate.is_floating_point() or not torch.isfinite(candidate).all():
        return _failed("candidate is not a finite floating-point tensor")
    cosine, relative = token_metrics(reference, candidate)
    off = (cosine < tolerances.min_cosine) | (relative > tolerances.max_relative_l2)  # [T]
    allowed_off = math.floor(tolerances.max_off_fraction * off.numel())
    worst_cosine, worst_relative = cosine.min().item(), relative.max().item()
    reasons = []
    if int(off.sum()) > allowed_off:
        reasons.append(
            f"{int(off.sum())} of {off.numel()} tokens outside cosine >= {tolerances.min_cosine} / "
            f"relative L2 <= {tolerances.max_relative_l2} (at most {allowed_off} allowed)"
        )
    if worst_relative > tolerances.hard_max_relative_l2:
        reasons.append(f"a token has relative L2 {worst_relative:.4g} > {tolerances.hard_max_relative_l2}")
    off_fraction = off.double().mean().item()
    return ProbeComparison(worst_cosine, worst_relative, off_fraction, not reasons, "; ".join(reasons))


def calibrate_tolerances(
    references: Sequence[torch.Tensor],
    honest_runs: Sequence[torch.Tensor],
    margin: float = 2.5,
    max_off_fraction: float = DEFAULT_TOLERANCES.max_off_fraction,
) -> Tolerances:
    """Propose tolerances from honest runs in another precision (e.g. a bfloat16 server).

    Pools the per-token errors of all pairs. The per-token tolerances are ``margin`` times the
    ``1 - max_off_fraction`` quantile of the honest errors (relative L2 and ``1 - cosine``); the
    hard bound is ``margin`` times the worst honest token. Check the proposal still fails the
    faults you care about (``compare_outputs`` on faulty runs) before adopting it.
    """
    if margin < 1.0:
        raise ValueError(f"margin must be >= 1 (it widens the honest errors), got {margin}")
    if len(references) != len(honest_runs) or not references:
        raise ValueError(f"need equally many references and honest runs (got {len(references)} and {len(honest_runs)})")
    cosine_gaps, relatives = [], []
    for reference, honest in zip(references, honest_runs):
        if reference.shape != honest.shape:
            raise ValueError(f"honest run shape {tuple(honest.shape)} != reference {tuple(reference.shape)}")
        cosine, relative = token_metrics(reference, honest)
        cosine_gaps.append(1.0 - cosine)
        relatives.append(relative)
    cosine_gap, relative = torch.cat(cosine_gaps), torch.cat(relatives)  # [all tokens]
    if relative.max().item() == 0.0:
        raise ValueError("honest runs equal the references exactly: they carry no information about rounding")
    quantile = 1.0 - max_off_fraction
    return Tolerances(
        min_cosine=max(-1.0, 1.0 - margin * torch.quantile(cosine_gap, quantile).item()),
        max_relative_l2=margin * torch.quantile(relative, quantile).item(),
        max_off_fraction=max_off_fraction,
        hard_max_relative_l2=margin * relative.max().item(),
    )
