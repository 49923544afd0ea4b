"""Softmax verification by shift invariance and K-digit base-b exponent decomposition (paper §4.4, eqs. 18–22).

In a probe session the verifier gets, for one layer, the server's attention scores
``Z = QKᵀ/√d`` (masked keys −inf) and its probabilities ``P_server``. It recomputes
``softmax(Z)`` without an exponential function: fixed-point quantisation, the shift of eq. 21,
the digit decomposition of eq. 22 and K table lookups per entry (``softmax_lookup``), rows split
across worker processes; then it normalises and compares with ``P_server`` entry by entry within
a derived tolerance.

Error bound (derivation). Let δ = 2^−f, R = b^K·δ the covered range, u = 2^−53, ε_T = 2^−t + 2^−52
the table entries' relative error (t = table_bits, plus exp's own rounding), n the number of keys,
a_i = e^{z_i − z_max} the exact numerators (the max has a = 1, so S = Σ a_i ≥ 1), â_i the computed ones.

- Quantisation: rounding z_i and z_max to multiples of δ moves the exponent by |η_i| ≤ δ.
- Lookup product: K factors each off by ≤ ε_T and K roundings, so â_i = a_i e^{η_i}(1 + r_i) with
  |r_i| ≤ ρ = (1 + ε_T)^K (1 + u)^K − 1. Write γ = e^δ(1 + ρ) and γ' = e^{−δ}(1 − ρ).
- Truncation: a shift ≥ b^K gives â_i = 0 while a_i ≤ τ = e^{−R+δ}.
- Normalising: Ŝ ∈ [γ'(S − nτ), γS], so for kept entries p̂_i/p_i ∈ [γ'/γ, γ/(γ'(1 − nτ))] and
  ``|p̂_i − p_i| ≤ λ·p_i`` with λ = γ/(γ'(1 − nτ)) − 1; truncated entries are off by at most τ.
  Hence ``|p̂_i − p_i| ≤ λ·p_i + τ`` and, as p_i ≤ 1, the absolute bound ``λ + τ`` (``absolute``).
- Honest server: a softmax in a dtype of unit roundoff u_s (exp within 2 ulp, the subtraction
  of the max off by u_s|x_i| in the exponent, an n-term sum, a division) is off by at most
  ε_i·p_i with ε_i = u_s(n + 8 + |x_i|), x_i = z_i − z_max.
- Tolerance per entry, with p_i ≤ p̂_i·γ/γ' + τ: ``tol_i = (λ + ε_i)(p̂_i γ/γ' + τ) + τ``.
  A row fails when some entry has ``|P_server,i − p̂_i| > tol_i`` or is not finite.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
import torch

from efedllm.analysis.softmax_lookup import lookup_numerators

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
FLOAT64_ROUNDOFF = 2.0**-53
UNDERFLOW_FLOOR = 2.0**-1000  # absolute slack for products that go subnormal


@dataclass(frozen=True)
class SoftmaxCheckConfig:
    """How the verifier decomposes exponents.

    base (b) and digits (K): each fixed-point shift is written as K base-b digits, so the tables
    hold K·b entries and shifts up to b^K − 1 are represented. fraction_bits (f): the fixed-point
    step is 2^−f. table_bits: significant bits kept in each table entry. server_dtype: the dtype
    the server computes softmax in (sets the honest server's rounding allowance).
    min_range: the smallest covered range b^K·2^−f accepted (a smaller one would let a server
    hide mass below e^−range).
    """

    base: int = 16
    digits: int = 5
    fraction_bits: int = 16
    table_bits: int = 52
    server_dtype: str = "float32"
    min_range: float = 12.0

    def __post_init__(self) -> None:
        _require_int("base", self.base, 2, 2**16)
        _require_int("digits", self.digits, 1, 32)
        _require_int("fraction_bits", self.fraction_bits, 0, 40)
        _require_int("table_bits", self.table_bits, 8, 52)
        if self.server_dtype not in UNIT_ROUNDOFF:
            raise ValueError(f"server_dtype must be one of {sorted(UNIT_ROUNDOFF)}, got {self.server_dtype!r}")
        if self.base**self.digits > 2**62:
            raise ValueError(f"base**digits = {self.base}**{self.digits} exceeds 2**62 (int64 shifts)")
        if self.covered_range < self.min_range:
            raise ValueError(
                f"base**digits * 2**-fraction_bits = {self.covered_range:.3g} is below min_range {self.min_range}: "
                "raise digits or base, or lower fraction_bits"
            )

    @property
    def step(self) -> float:
        return 2.0**-self.fraction_bits

    @property
    def covered_range(self) -> float:
        return self.base**self.digits * self.step

    @property
    def table_entries(self) -> int:
        return self.base * self.digits


def _require_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"SoftmaxCheckConfig.{name} must be an integer in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class ErrorBound:
    """The derived error terms (see the module docstring) for rows of ``keys`` entries."""

    relative: float  # λ
    truncation: float  # τ
    ratio_up: float  # γ/γ'
    server_roundoff: float  # u_s
    keys: int

    @property
    def absolute(self) -> float:
        """``λ + τ``: bound on |p̂_i − softmax(z)_i| for every entry."""
        return self.relative + self.truncation


def derive_error_bound(config: SoftmaxCheckConfig, keys: int) -> ErrorBound:
    """λ, τ and γ/γ' for this configuration and row length (module docstring)."""
    table_error = 2.0**-config.table_bits + 2.0**-52
    product = (1 + table_error) ** config.digits * (1 + FLOAT64_ROUNDOFF) ** config.digits - 1
    up, down = math.exp(config.step) * (1 + product), math.exp(-config.step) * (1 - product)
    truncation = math.exp(-config.covered_range + config.step) + UNDERFLOW_FLOOR
    if keys * truncation >= 0.5:
        raise ValueError(f"covered range {config.covered_range:.3g} too small for rows of {keys} keys")
    relative = up / (down * (1 - keys * truncation)) - 1
    return ErrorBound(relative, truncation, up / down, UNIT_ROUNDOFF[config.server_dtype], keys)


@dataclass(frozen=True)
class SoftmaxCheckResult:
    """Outcome of one check. ``row_failed`` has the scores' leading shape [..., q]."""

    passed: bool
    max_error: float  # max |P_server − p̂| over finite entries
    max_tolerance_ratio: float  # max |P_server − p̂| / tol (≤ 1 on every passing row)
    error_bound: float  # λ + τ, the verifier's own absolute error bound
    row_failed: torch.Tensor
    failed_rows: tuple[tuple[int, ...], ...]


def _validate_scores(scores: torch.Tensor, config: SoftmaxCheckConfig) -> None:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {type(scores).__name__}")
    if scores.dim() < 2 or scores.shape[-1] < 1 or scores.numel() == 0:
        raise ValueError(f"scores must have shape [..., queries, keys] with keys >= 1, got {tuple(scores.shape)}")
    if torch.isnan(scores).any() or torch.isposinf(scores).any():
        raise ValueError("scores contain NaN or +inf (only -inf is allowed, for masked keys)")
    if not torch.isfinite(scores).any(dim=-1).all():
        raise ValueError("scores have a fully masked row (every key -inf): softmax is undefined there")
    limit = 2.0 ** (61 - config.fraction_bits)
    if scores.masked_fill(torch.isinf(scores), 0).abs().max().item() >= limit:
        raise ValueError(f"scores exceed {limit:.3g} in magnitude: fixed point with {config.fraction_bits} bits overflows")


class SoftmaxVerifier:
    """Lookup-based softmax recomputation with a pool of worker processes.

    Lifecycle: construct (no processes), ``start()`` (spawns ``workers`` processes when
    workers > 1), ``probabilities`` / ``verify`` any number of times, ``shutdown()``.
    Also a context manager.
    """

    def __init__(self, config: SoftmaxCheckConfig, workers: int = 1) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.config = config
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> "SoftmaxVerifier":
        if self.workers > 1 and self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"))
        return self

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "SoftmaxVerifier":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _numerators(self, rows: np.ndarray) -> np.ndarray:
        """Lookup numerators of rows [R, keys], split into contiguous chunks across the pool."""
        c = self.config
        arguments = (c.base, c.digits, c.fraction_bits, c.table_bits)
        if self.workers == 1 or rows.shape[0] < 2:
            return lookup_numerators(rows, *arguments)
        if self._pool is None:
            raise RuntimeError("SoftmaxVerifier.start() must be called before using several workers")
        chunks = [chunk for chunk in np.array_split(rows, self.workers) if chunk.shape[0]]
        futures = [self._pool.submit(lookup_numerators, chunk, *arguments) for chunk in chunks]
        return np.concatenate([future.result() for future in futures], axis=0)

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """softmax(scores) over the last dim by lookup; [..., q, k] -> [..., q, k] float64."""
        _validate_scores(scores, self.config)
        rows = scores.detach().to(torch.float64).reshape(-1, scores.shape[-1]).numpy()  # [R, k]
        numerators = self._numerators(rows)  # [R, k]
        probabilities = numerators / numerators.sum(axis=1, keepdims=True)  # normalised in one place
        return torch.from_numpy(probabilities).reshape(scores.shape)

    def verify(self, scores: torch.Tensor, server_probs: torch.Tensor) -> SoftmaxCheckResult:
        """Compare the server's probabilities with the lookup softmax of its scores, entry by entry."""
        if not isinstance(server_probs, torch.Tensor) or server_probs.shape != scores.shape:
            raise ValueError(
                f"server_probs must be a tensor of the scores' shape {tuple(scores.shape)}, "
                f"got {tuple(getattr(server_probs, 'shape', ()))}"
            )
        if not server_probs.is_floating_point():
            raise ValueError(f"server_probs must be floating point, got {server_probs.dtype}")
        expected = self.probabilities(scores)  # [..., q, k] float64
        bound = derive_error_bound(self.config, scores.shape[-1])
        return _compare(scores.detach().to(torch.float64), expected, server_probs.detach().to(torch.float64), bound)


def _tolerance(scores: torch.Tensor, expected: torch.Tensor, bound: ErrorBound) -> torch.Tensor:
    """tol_i = (λ + ε_i)(p̂_i γ/γ' + τ) + τ with ε_i = u_s(n + 8 + |x_i|); shapes [..., q, k]."""
    row_max = scores.amax(dim=-1, keepdim=True)
    distance = (row_max - scores).nan_to_num(posinf=0.0)  # |x_i|; masked keys have p̂ = 0, so any finite value
    server = bound.server_roundoff * (bound.keys + 8 + distance)
    upper_truth = expected * bound.ratio_up + bound.truncation
    return (bound.relative + server) * upper_truth + bound.truncation


def _compare(scores: torch.Tensor, expected: torch.Tensor, served: torch.Tensor, bound: ErrorBound) -> SoftmaxCheckResult:
    tolerance = _tolerance(scores, expected, bound)
    error = (served - expected).abs()  # NaN where the server sent NaN
    finite = torch.isfinite(served)
    entry_failed = ~finite | (error > tolerance)
    row_failed = entry_failed.any(dim=-1)  # [..., q]
    finite_error = error.masked_fill(~finite, 0.0)
    failed_rows = tuple(tuple(int(i) for i in index) for index in row_failed.nonzero().tolist())
    return SoftmaxCheckResult(
        passed=not bool(row_failed.any()),
        max_error=float(finite_error.max()),
        max_tolerance_ratio=float((finite_error / tolerance).max()),
        error_bound=bound.absolute,
        row_failed=row_failed,
        failed_rows=failed_rows,
    )


def verify_softmax(
    scores: torch.Tensor, server_probs: torch.Tensor, config: SoftmaxCheckConfig | None = None, workers: int = 1
) -> SoftmaxCheckResult:
    """Check ``server_probs == softmax(scores)`` within the derived tolerance (one-shot pool)."""
    with SoftmaxVerifier(config or SoftmaxCheckConfig(), workers) as verifier:
        return verifier.verify(scores, server_probs)


def lookup_softmax(scores: torch.Tensor, config: SoftmaxCheckConfig | None = None, workers: int = 1) -> torch.Tensor:
    """softmax(scores) recomputed by digit decomposition and table lookup (float64)."""
    with SoftmaxVerifier(config or SoftmaxCheckConfig(), workers) as verifier:
        return verifier.probabilities(scores)


# Tampering a dishonest server might try (used by tests, the benchmark and the report).


def tamper_permute_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Permute the query rows (dim −2) of probabilities [..., q, k] with a derangement-like shift."""
    order = torch.randperm(probs.shape[-2], generator=generator)
    if torch.equal(order, torch.arange(probs.shape[-2])):
        order = order.roll(1)
    return probs.index_select(-2, order)


def tamper_temperature(scores: torch.Tensor, temperature: float = 1.1) -> torch.Tensor:
    """softmax(Z / τ) with τ ≠ 1, in float32 like a server would."""
    return torch.softmax(scores.to(torch.float32) / temperature, dim=-1)


def tamper_drop_key(probs: torch.Tensor, key: int) -> torch.Tensor:
    """Zero one key's probability in every row and renormalise the rest."""
    dropped = probs.clone()
    dropped[..., key] = 0
    return dropped / dropped.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
