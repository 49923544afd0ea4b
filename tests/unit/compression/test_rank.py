import math

import pytest

from efedllm.compression.rank import (
    break_even_rank,
    compression_ratio,
    parameter_count,
    rank_for_energy,
    rank_for_ratio,
    retained_energy,
    stored_bytes,
)


def test_paper_gpt2_example_keeping_40_percent_gives_53_32_percent():
    # GPT-2 c_attn: 768 x 2304, keep 40% of its 768 singular values -> k = 307
    k = int(0.4 * 768)
    assert k == 307
    assert parameter_count(768, 2304, k) == 307 * 3073 == 943_411
    assert round(100 * compression_ratio(768, 2304, k), 2) == 53.32


def test_rank_for_ratio_hand_checked():
    # eq. 15: floor(m n c / (m + n + 1))
    assert rank_for_ratio(768, 2304, 0.5332) == math.floor(768 * 2304 * 0.5332 / 3073) == 307
    assert rank_for_ratio(576, 576, 0.9) == math.floor(576 * 576 * 0.9 / 1153) == 258
    assert rank_for_ratio(1536, 576, 0.5) == 209  # 442368 / 2113 = 209.35
    assert rank_for_ratio(10, 10, 1.0) == 4  # 100 / 21 = 4.76
    # round-trip: the rank of a ratio never exceeds it
    for k in (1, 17, 100, 287):
        assert rank_for_ratio(576, 576, compression_ratio(576, 576, k)) == k


def test_rank_for_ratio_clips_to_valid_ranks():
    assert rank_for_ratio(4, 4, 0.01) == 1
    assert rank_for_ratio(2, 3, 1.0) == 1  # 6 / 6 = 1
    assert rank_for_ratio(3, 1000, 1.0) == 2  # 3000 / 1004 = 2.99: eq. 15 never exceeds min(m, n)


def test_break_even_rank():
    assert break_even_rank(576, 576) == 287  # 287 * 1153 = 330911 < 331776 <= 288 * 1153
    assert parameter_count(576, 576, 288) > 576 * 576
    assert break_even_rank(1, 1) == 0


def test_rank_for_energy_hand_checked():
    values = [3.0, 2.0, 1.0, 0.0]  # squares 9, 4, 1, 0 of total 14
    assert rank_for_energy(values, 9 / 14) == 1
    assert rank_for_energy(values, 0.65) == 2
    assert rank_for_energy(values, 13 / 14) == 2
    assert rank_for_energy(values, 0.95) == 3
    assert rank_for_energy(values, 1.0) == 3
    assert retained_energy(values, 2) == pytest.approx(13 / 14)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), True])
def test_bad_ratio_and_energy_are_rejected(bad):
    with pytest.raises(ValueError, match="ratio"):
        rank_for_ratio(10, 10, bad)
    with pytest.raises(ValueError, match="energy"):
        rank_for_energy([1.0], bad)


def test_bad_shapes_and_orders_are_rejected():
    with pytest.raises(ValueError, match="dimension"):
        parameter_count(0, 5, 1)
    with pytest.raises(ValueError, match="rank"):
        parameter_count(5, 5, 6)
    with pytest.raises(ValueError, match="descending"):
        rank_for_energy([1.0, 2.0], 0.5)


def test_stored_bytes():
    assert stored_bytes(576, 1536, None) == 576 * 1536 * 4
    assert stored_bytes(576, 1536, 100, element_bytes=2) == 100 * 2113 * 2
