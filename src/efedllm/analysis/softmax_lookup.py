"""The verifier workers' kernel: exponentials by K-digit base-b decomposition and table lookup (§4.4).

Numpy only, so that a spawned worker process starts without importing torch. Every operation is
elementwise within a row (rounding, integer digits, lookups, a fixed-order product), so any
split of the rows across processes gives bit-identical results.

For one row of scores z (masked keys are −inf):

1. fixed point: ``q_i = round(z_i · 2^f)`` (integers; step δ = 2^−f);
2. shift (eq. 21): ``s_i = max_j q_j − q_i ≥ 0``, so that ``e^{z_i − z_max} ≈ e^{−s_i δ}``
   (shift invariance of softmax, eqs. 19–20);
3. digits (eq. 22): ``s_i = Σ_{j<K} d_ij b^j`` with ``0 ≤ d_ij < b``, hence
   ``e^{−s_i δ} = Π_j e^{−d_ij b^j δ} = Π_j T_j[d_ij]``: K lookups in tables of b entries;
4. shifts of b^K or more (and masked keys) give 0: their true value is below ``e^{−b^K δ + δ}``.
"""

from __future__ import annotations

import numpy as np


def round_to_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Round each value to ``bits`` significant bits (relative error at most 2^−bits)."""
    mantissa, exponent = np.frexp(values)  # mantissa in [0.5, 1)
    return np.ldexp(np.round(mantissa * 2.0**bits) / 2.0**bits, exponent)


def lookup_tables(base: int, digits: int, fraction_bits: int, table_bits: int) -> np.ndarray:
    """``T[j, d] = e^{−d · b^j · 2^−f}`` rounded to ``table_bits`` bits; shape [digits, base]."""
    step = 2.0**-fraction_bits
    digit_values = np.arange(base, dtype=np.float64)  # [b]
    place_values = np.array([float(base**j) for j in range(digits)])  # [K]
    exponents = -np.outer(place_values, digit_values) * step  # [K, b]
    return round_to_bits(np.exp(exponents), table_bits)


def quantised_shifts(scores: np.ndarray, fraction_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point shifts ``s = max q − q`` (eq. 21) for rows of scores [rows, keys]; masked -> mask False."""
    finite = np.isfinite(scores)  # [rows, keys]; −inf marks a masked key
    quantised = np.rint(np.where(finite, scores, 0.0) * 2.0**fraction_bits).astype(np.int64)
    lowest = np.iinfo(np.int64).min
    row_max = np.where(finite, quantised, lowest).max(axis=1, keepdims=True)  # [rows, 1]
    return np.where(finite, row_max - quantised, 0), finite


def lookup_numerators(scores: np.ndarray, base: int, digits: int, fraction_bits: int, table_bits: int) -> np.ndarray:
    """Unnormalised softmax numerators ``e^{z_i − z_max}`` by table lookup; [rows, keys] float64."""
    tables = lookup_tables(base, digits, fraction_bits, table_bits)  # [K, b]
    shifts, finite = quantised_shifts(scores, fraction_bits)  # [rows, keys] int64, bool
    in_range = finite & (shifts < base**digits)
    remaining = np.where(in_range, shifts, 0)
    numerators = np.ones(scores.shape, dtype=np.float64)
    for place in range(digits):  # fixed order: identical rounding whatever the row split
        digit = remaining % base
        remaining = remaining // base
        numerators *= tables[place][digit]
    return np.where(in_range, numerators, 0.0)
