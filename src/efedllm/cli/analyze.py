"""``efedllm analyze [--out DIR]``: write the analysis report (Markdown + PNGs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from efedllm.analysis.report import write_report
from efedllm.analysis.results import run_all
from efedllm.cli.parser import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``analyze`` subcommand to the top-level parser's subparsers."""
    parser = subparsers.add_parser(
        "analyze",
        help="reproduce and measure the paper's analyses (Theorem 4.1, Tables 2-3, Figs. 6-7, softmax check)",
        description="Write report.md and PNG plots: paper value, reproduced value and measured value side by side.",
    )
    parser.add_argument("--out", type=Path, default=Path("report"), help="output directory (default: report/)")
    parser.add_argument("--repeats", type=positive_int, default=15, help="timing repetitions per point (default 15)")
    parser.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    """Compute, measure and write the report; returns the process exit code."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"efedllm analyze: --out {out} exists and is not a directory", file=sys.stderr)
        return 2
    try:
        path = write_report(run_all(timing_repeats=args.repeats), out)
    except OSError as error:
        print(f"efedllm analyze: cannot write the report to {out}: {error}", file=sys.stderr)
        return 1
    print(f"report written to {path}")
    return 0
