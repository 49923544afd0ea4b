"""``efedllm analyze``: the subcommand registers, writes the report and names bad arguments."""

import argparse

import pytest

from efedllm.cli import analyze as cli


def _parser():
    parser = argparse.ArgumentParser(prog="efedllm")
    cli.register(parser.add_subparsers())
    return parser


def test_analyze_writes_markdown_and_plots(tmp_path):
    out = tmp_path / "report"
    args = _parser().parse_args(["analyze", "--out", str(out), "--repeats", "1"])
    assert args.func(args) == 0
    pngs = {path.name for path in out.glob("*.png")}
    assert pngs == {"theorem41.png", "table2.png", "block_memory.png", "fig6_bandwidth.png", "fig7_reduce_rate.png"}
    assert all((out / name).stat().st_size > 10_000 for name in pngs)
    text = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("## Summary", "## Theorem 4.1", "## Table 2", "## Table 3", "## What the formulas leave out",
                    "## Eqs. 15–17", "## §4.4"):
        assert heading in text
    assert "about 60 %" in text and "29.87 %" in text  # the paper's figure next to what its formula gives
    assert "**no**" not in text and "**missed**" not in text and "≠" not in text


def test_default_out_is_report_directory():
    args = _parser().parse_args(["analyze"])
    assert str(args.out) == "report" and args.func is cli.run_analyze


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    args = _parser().parse_args(["analyze", "--out", str(target)])
    assert cli.run_analyze(args) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "many"])
def test_bad_repeats_is_an_argument_error(value, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["analyze", "--repeats", value])
    assert "positive integer" in capsys.readouterr().err
