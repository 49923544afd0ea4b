"""Does a probe pass? Comparing a server's hidden states with the verifier's own reference.

Metrics are computed **per token** (one row of the hidden dimension): whole-tensor metrics are
useless on Llama-style models, whose first position is an attention sink with a hidden state up
to ~100x larger than the others (SmolLM2-135M after block 19: norm ~20,000 against a median of
~218), so a whole-tensor cosine or relative error sees only that token.

A token is *off* when its cosine similarity to the reference is below ``min_cosine`` or its
relative L2 error ``||candidate_t - reference_t|| / ||reference_t||`` exceeds
``max_relative_l2``. A probe passes when at most ``max_off_fraction`` of its tokens are off and
no token's relative L2 error exceeds ``hard_max_relative_l2``. The off-token allowance exists
because honest low-precision rounding hits rare tokens hard (one token in ~5,000 above 0.1).

Measured on SmolLM2-135M-Instruct (Q4_1 GGUF dequantised), reference in float32, 88 WikiText-2
test paragraphs of 128 tokens (40 + 48, disjoint), server spans 0..9, 10..19, 20..29; "per-token
relative L2" quantiles pool all tokens of a run:

=========================  =========================  =================  ================
run                        per-token rel. L2 median   98th percentile    worst token
=========================  =========================  =================  ================
honest bfloat16 server     0.0080 - 0.0087            0.013 - 0.020      0.20 (0..9)
honest float16 server      -                          0.0013 - 0.0065    0.0115
``noise:0.01``, 10..19     0.09                       0.11               0.14
``noise:0.01``, 0..9/20..  0.0106 / 0.0110            0.014 / 0.019      0.025
``skip-blocks:1``          -                          >= 0.30            >= 0.33
``wrong-model``            -                          >= 2.9             >= 3.0
=========================  =========================  =================  ================

Honest bfloat16: worst ``1 - cosine`` 0.020 (the rare off token), 98th percentile 1.4e-4; at
most 2.3% of a probe's tokens off. Defaults: ``min_cosine = 0.999``, ``max_relative_l2 = 0.05``
(2.5x the honest bfloat16 98th percentile), ``max_off_fraction = 0.05`` (2x the honest worst),
``hard_max_relative_l2 = 0.5`` (2.5x the honest worst token). With them every honest bfloat16
and float16 probe passed (264/264 and 120/120); ``noise:0.01`` on blocks 10..19, ``skip-blocks``,
``skip-blocks:1``, ``wrong-model``, ``random`` and ``zeros`` failed every probe; ``intermittent:0.3``
failed exactly its corrupted steps.

Limit, stated plainly: ``noise:SIGMA`` scales its noise by the RMS of the whole output
(:mod:`~efedllm.server.faults`). Where the sink dominates that RMS (the output of blocks
10..19) ordinary tokens get ~9x SIGMA and 1% noise is caught on every probe. Where it does not
(outputs of blocks 0..9 and 20..29), 1% noise is ~1.1% per token, *inside* honest bfloat16
rounding (median 0.85%, 98th percentile 2%), and no reference tolerance can catch it without
deactivating honest bfloat16 servers (an element-wise relative statistic did not separate them
either). The verifier catches it anyway from a server that announces float32, the reference's own
dtype: such a server runs the same arithmetic and is held to rounding-level agreement
(``SAME_DTYPE_TOLERANCES`` in :mod:`efedllm.verifier.config`); a server announcing bfloat16 buys
slack of bfloat16's size, no more.
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

    min_cosine: float = 0.999
    max_relative_l2: float = 0.05
    max_off_fraction: float = 0.05
    hard_max_relative_l2: float = 0.5

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
