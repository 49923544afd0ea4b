"""PNG figures of the analysis report (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from efedllm.analysis import io_model
from efedllm.analysis.results import H100_SHARED_MEMORY_BYTES, AnalysisResults


def _subplots(*grid: int, figsize: tuple[float, float]):
    """A figure of its own (not pyplot's global state; PNGs are drawn by the Agg canvas) and its axes."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*grid)


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_theorem41(results: AnalysisResults, path: Path) -> Path:
    figure, axis = _subplots(figsize=(6, 4))
    sides = list(range(1, 129))
    axis.plot(sides, [1 - 1 / side for side in sides], label="Theorem 4.1, square tile k = m (formula)")
    counted = [row for row in results.theorem41 if row.tile_rows == row.tile_cols]
    axis.scatter([r.tile_rows for r in counted], [r.counted for r in counted], color="C3", zorder=3,
                 label="counted: executed 64 × 64 tiled product")
    for row in results.table2:
        if row.row.n <= 128:
            axis.scatter([row.row.n], [row.row.reduction_rate], marker="s", color="C2", zorder=3)
    axis.scatter([], [], marker="s", color="C2", label="Table 2 (k = m = n), n ≤ 128")
    axis.set(xscale="log", xlabel="tile side k = m", ylabel="global-read reduction rate R_t",
             title="Theorem 4.1: reduction rate of global reads")
    axis.legend(fontsize=8)
    return _save(figure, path)


def plot_table2(results: AnalysisResults, path: Path) -> Path:
    figure, axis = _subplots(figsize=(6, 4))
    labels = [str(row.row.n) for row in results.table2]
    positions = range(len(labels))
    axis.bar([p - 0.2 for p in positions], [r.row.centralised_reads for r in results.table2], 0.4, label="centralised 2n³")
    axis.bar([p + 0.2 for p in positions], [r.row.federated_reads for r in results.table2], 0.4, label="federated 2n²")
    axis.set(yscale="log", xticks=list(positions), xticklabels=labels, xlabel="n", ylabel="global memory reads",
             title="Table 2: reads for two n × n matrices")
    axis.legend(fontsize=8)
    return _save(figure, path)


def plot_block_memory(results: AnalysisResults, path: Path) -> Path:
    study = results.block_memory
    figure, (left, right) = _subplots(1, 2, figsize=(11, 4.2))
    n = study.large_n
    capacities = [point.capacity for point in study.sweep]
    left.plot(capacities, [p.unstaged_reads for p in study.sweep], "k--", label="no hierarchy 2n³")
    left.plot(capacities, [p.tiled_reads for p in study.sweep], "o-", label="best square tiles (fits M)")
    left.plot(capacities, [p.bound_estimate for p in study.sweep], ":", label="I/O estimate 2n³/√M")
    lru = [(c, io_model.lru_naive_reads_closed_form(n, n, n, c)) for c in capacities]
    left.plot([c for c, r in lru if r], [r for c, r in lru if r], "x", label="naive loop, LRU block memory")
    left.axhline(2 * n * n, color="C2", lw=0.8, label="Table 2 figure 2n² (whole matrices)")
    left.axvline(H100_SHARED_MEMORY_BYTES / 4, color="grey", lw=0.8)
    left.text(H100_SHARED_MEMORY_BYTES / 4, 2 * n**3, " H100 SM shared mem", fontsize=7, rotation=90, va="top")
    if study.machine_l2_bytes:
        left.axvline(study.machine_l2_bytes / 4, color="brown", lw=0.8)
        left.text(study.machine_l2_bytes / 4, 2 * n**3, " this CPU's L2", fontsize=7, rotation=90, va="top")
    left.set(xscale="log", yscale="log", xlabel="block memory M (float32 elements)", ylabel="global reads",
             title=f"n = {n}: reads vs block memory (closed forms)")
    left.legend(fontsize=7)
    right.plot(study.small_capacities, study.small_tiled_counted, "o-", label="tiled schedule (executed)")
    right.plot(study.small_capacities, study.small_lru_counted, "s-", label="naive loop + LRU (simulated)")
    right.plot(study.small_capacities, [io_model.io_bound_estimate(study.small_n, study.small_n, study.small_n, c)
                                        for c in study.small_capacities], ":", label="2n³/√M")
    right.set(xscale="log", yscale="log", xlabel="block memory M (elements)", ylabel="global reads (counted)",
              title=f"n = {study.small_n}: counted reads")
    right.legend(fontsize=7)
    return _save(figure, path)


def plot_fig6(results: AnalysisResults, path: Path) -> Path:
    points = results.bandwidth.points
    figure, axis = _subplots(figsize=(6, 4))
    ratios = [p.ratio for p in points]
    axis.plot(ratios, [p.dense_bytes / 2**20 for p in points], "k--", label="dense WX (eq. 16)")
    axis.plot(ratios, [p.lowrank_bytes / 2**20 for p in points], "o-", label="SVD ŴX (eq. 17)")
    axis.set(xlabel="compression ratio c", ylabel="global-memory traffic per batch (MiB)",
             title="Fig. 6: BERT first linear layer, batch 10, float32")
    axis.legend(fontsize=8)
    return _save(figure, path)


def plot_fig7(results: AnalysisResults, path: Path) -> Path:
    study = results.bandwidth
    figure, axis = _subplots(figsize=(6, 4))
    ratios = [p.ratio for p in study.points]
    axis.plot(ratios, [100 * p.reduce_rate for p in study.points], "o-", label="reduce rate, eqs. 16–17 (reproduced)")
    axis.plot(ratios, [100 * r for r in study.weight_reduce_rates], "--", label="weights alone (upper limit)")
    axis.plot([t.ratio for t in study.timings], [100 * t.time_reduce_rate for t in study.timings], "s-",
              label="measured time reduction (this CPU)")
    axis.scatter([0.7], [60], marker="*", s=140, color="C3", zorder=3, label="paper: 'about 60 %' at 0.7")
    axis.axhline(0, color="grey", lw=0.6)
    axis.set(xlabel="compression ratio c", ylabel="reduction (%)", title="Fig. 7: bandwidth reduce rate")
    axis.legend(fontsize=8)
    return _save(figure, path)


def write_plots(results: AnalysisResults, directory: Path) -> dict[str, Path]:
    """All figures, by report section name."""
    return {
        "theorem41": plot_theorem41(results, directory / "theorem41.png"),
        "table2": plot_table2(results, directory / "table2.png"),
        "block_memory": plot_block_memory(results, directory / "block_memory.png"),
        "fig6": plot_fig6(results, directory / "fig6_bandwidth.png"),
        "fig7": plot_fig7(results, directory / "fig7_reduce_rate.png"),
    }
