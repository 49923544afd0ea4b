"""The two-level memory read counter: executed schedules vs closed forms and the I/O bound."""

import numpy as np
import pytest

from efedllm.analysis import io_model, memory


def _operands(m, n, p, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, n)), rng.standard_normal((n, p))


@pytest.mark.parametrize(("rows", "cols", "depth"), [(1, 1, 1), (3, 5, 2), (4, 4, 7), (13, 11, 3), (20, 9, 20)])
def test_tiled_schedule_counts_match_the_closed_form(rows, cols, depth):
    a, b = _operands(13, 7, 9)
    counter = io_model.ReadCounter()
    product = io_model.tiled_matmul(a, b, rows, cols, depth, counter)
    np.testing.assert_allclose(product, a @ b, rtol=1e-12, atol=1e-12)
    assert counter.global_reads == memory.reads_with_tiles(13, 7, 9, min(rows, 13), min(cols, 9))


def test_unstaged_schedule_reads_2mnp():
    a, b = _operands(5, 6, 4)
    counter = io_model.ReadCounter()
    np.testing.assert_allclose(io_model.unstaged_matmul(a, b, counter), a @ b, rtol=1e-12)
    assert counter.global_reads == memory.reads_without_hierarchy(5, 6, 4)


def test_lowrank_schedules_match_table3():
    rng = np.random.default_rng(1)
    m, n, p, rank = 12, 8, 5, 3
    u, s, v_t, x = rng.standard_normal((m, rank)), rng.random(rank), rng.standard_normal((rank, n)), rng.standard_normal((n, p))
    expected = u @ np.diag(s) @ v_t @ x
    unstaged, staged = io_model.ReadCounter(), io_model.ReadCounter()
    np.testing.assert_allclose(io_model.lowrank_matmul_unstaged(u, s, v_t, x, unstaged), expected, rtol=1e-12)
    np.testing.assert_allclose(io_model.lowrank_matmul_with_hierarchy(u, s, v_t, x, staged), expected, rtol=1e-12)
    assert unstaged.global_reads == memory.lowrank_reads_without_hierarchy(m, n, p, rank)
    assert staged.global_reads == memory.lowrank_reads_with_hierarchy(m, n, p, rank)


def test_theorem41_figure_is_reached_exactly_from_its_block_memory():
    a, b = _operands(16, 16, 16)
    needed = io_model.capacity_for_tile(8, 4)
    counter = io_model.ReadCounter(capacity=needed)
    io_model.tiled_matmul(a, b, 8, 4, 1, counter)
    assert 1 - counter.global_reads / (2 * 16**3) == pytest.approx(memory.theorem41_reduction_rate(8, 4))
    with pytest.raises(io_model.BlockMemoryOverflow, match="resident"):
        io_model.tiled_matmul(a, b, 8, 4, 1, io_model.ReadCounter(capacity=needed - 1))


def test_table2_figure_needs_block_memory_for_whole_matrices():
    n = 12
    capacity = io_model.capacity_for_tile(n, n)
    assert capacity == n * n + 2 * n
    assert io_model.tiled_reads_for_capacity(n, n, n, capacity) == 2 * n * n
    assert io_model.tiled_reads_for_capacity(n, n, n, capacity - 1) > 2 * n * n


@pytest.mark.parametrize(("m", "n", "p"), [(4, 5, 6), (6, 8, 7), (3, 3, 9)])
def test_lru_simulation_matches_its_closed_form(m, n, p):
    for capacity in range(1, n * p + 3 * n):
        closed = io_model.lru_naive_reads_closed_form(m, n, p, capacity)
        if closed is not None:
            assert io_model.lru_naive_reads(m, n, p, capacity) == closed, capacity


def test_lru_naive_loop_needs_a_whole_operand_to_reach_the_whole_matrix_figure():
    n = 8
    reads = [io_model.lru_naive_reads(n, n, n, capacity) for capacity in (n, 3 * n, n * n + 2 * n)]
    assert reads == [2 * n**3, n * n + n**3, 2 * n * n]


@pytest.mark.parametrize("capacity", [64, 256, 1024, 4096, 16384])
def test_tiled_reads_follow_the_io_bound(capacity):
    n = 512
    reads = io_model.tiled_reads_for_capacity(n, n, n, capacity)
    assert 1.0 <= reads / io_model.io_bound_estimate(n, n, n, capacity) <= 1.3


def test_best_square_tile_is_the_largest_that_fits():
    for capacity in range(3, 500):
        side = io_model.best_square_tile(capacity)
        assert side * side + 2 * side <= capacity < (side + 1) ** 2 + 2 * (side + 1)
    with pytest.raises(ValueError, match="cannot hold"):
        io_model.best_square_tile(2)
