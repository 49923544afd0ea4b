"""Theorem 4.1, Table 2 and Table 3 formulas (paper §4.1, §4.3)."""

import pytest

from efedllm.analysis import memory


@pytest.mark.parametrize(
    ("k", "m", "expected"),
    [(1, 1, 0.0), (2, 2, 0.5), (4, 8, 1 - 1 / 8 - 1 / 16), (10, 10, 0.9), (100, 50, 1 - 1 / 200 - 1 / 100)],
)
def test_theorem41_formula(k, m, expected):
    assert memory.theorem41_reduction_rate(k, m) == pytest.approx(expected, abs=1e-15)


def test_tiled_reads_match_theorem41_when_tiles_divide():
    m, n, p = 48, 20, 40
    for k, tile_cols in [(1, 1), (4, 8), (16, 20), (48, 40)]:
        reads = memory.reads_with_tiles(m, n, p, k, tile_cols)
        assert reads == pytest.approx(memory.reads_without_hierarchy(m, n, p) * (1 - memory.theorem41_reduction_rate(k, tile_cols)))


def test_table2_reproduces_the_formula_values():
    rows = {row.n: row for row in memory.table2()}
    assert sorted(rows) == [5, 10, 100, 10_000]
    assert (rows[5].centralised_reads, rows[5].federated_reads) == (250, 50)
    assert (rows[10].centralised_reads, rows[10].federated_reads) == (2_000, 200)
    assert (rows[100].centralised_reads, rows[100].federated_reads) == (2_000_000, 20_000)
    assert (rows[10_000].centralised_reads, rows[10_000].federated_reads) == (2 * 10**12, 2 * 10**8)
    for n, row in rows.items():
        assert row.reduction_rate == pytest.approx(1 - 1 / n)
        assert row.reduction_rate == pytest.approx(memory.theorem41_reduction_rate(n, n))


def test_table3_bert_at_ratio_07():
    rows = {row.quantity: row for row in memory.table3(3072, 768, 30, rank=429)}
    storage = rows["storage (weight elements)"]
    assert (storage.dense, storage.low_rank) == (3072 * 768, 429 * (3072 + 768 + 1))
    unstaged = rows["reads, no hierarchy"]
    assert (unstaged.dense, unstaged.low_rank) == (2 * 3072 * 768 * 30, 2 * 429 * 30 * 3841)
    assert unstaged.reduction_rate == pytest.approx(storage.reduction_rate)  # both 1 - k(m+n+1)/(mn)
    staged = rows["reads, with hierarchy"]
    assert (staged.dense, staged.low_rank) == (3072 * 768 + 768 * 30, 429 * 3841 + 768 * 30)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="tile_rows"):
        memory.theorem41_reduction_rate(0, 3)
    with pytest.raises(ValueError, match="rank"):
        memory.table3(10, 5, 3, rank=6)
    with pytest.raises(ValueError, match="p must"):
        memory.reads_without_hierarchy(3, 3, -1)
