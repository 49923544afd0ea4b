"""Measure the peak resident memory that loading a span (or the whole model) adds to a process.

Run as ``python -m efedllm.models.memory_probe MODEL START END [--whole]``; prints one JSON line.
The peak is reset (``/proc/self/clear_refs``) after imports, so importing torch is not counted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# imported before the baseline below, so that the libraries' own memory is not counted
from efedllm.models.sources import resolve_model
from efedllm.models.span import load_client_parts, load_span
from efedllm.models.weights import load_config


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("start", type=int)
    parser.add_argument("end", type=int)
    parser.add_argument("--whole", action="store_true", help="also load the client parts (the whole model)")
    args = parser.parse_args()
    load_config(resolve_model(args.model))  # warm caches and imports before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM)
    before = _status_kib("VmRSS")
    loaded = [load_span(args.model, args.start, args.end)]
    if args.whole:
        loaded.append(load_client_parts(args.model))
    peak = _status_kib("VmHWM")
    print(json.dumps({"rss_before_mib": before / 1024, "peak_increase_mib": (peak - before) / 1024}))


if __name__ == "__main__":
    main()
