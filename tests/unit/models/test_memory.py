"""Loading a span holds only that span's weights."""

from __future__ import annotations

import json
import subprocess
import sys


def _peak_increase(*arguments: str) -> float:
    output = subprocess.run(
        [sys.executable, "-m", "efedllm.models.memory_probe", "smollm2-135m", *arguments],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_increase_mib"]


def test_a_third_of_the_blocks_costs_well_under_half_the_whole_model():
    span = _peak_increase("0", "10")
    whole = _peak_increase("0", "30", "--whole")
    assert span / whole < 0.4, (span, whole)
