"""What each import costs a fresh process: resident memory (MiB) and seconds, one module after another
in the order a server imports them, with hivemind imported whole and without its averaging, MoE and
optimiser packages (as the ``efedllm`` command does). Each variant runs in its own interpreter.

Usage: python benchmarks/import_cost.py     Prints one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys

MODULES = ["torch", "hivemind.dht", "transformers", "transformers.masking_utils",
           "transformers.models.llama.modeling_llama", "gguf", "efedllm.models.span", "efedllm.server.server"]
PROBE = """
import importlib, json, sys, time
if sys.argv[1] == "lean":
    from efedllm.common.lean_imports import register_lean_hivemind
    register_lean_hivemind()
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
steps, previous = [], rss()
for name in sys.argv[2:]:
    started = time.perf_counter(); importlib.import_module(name); now = rss()
    steps.append({"module": name, "rss_mib": round(now - previous, 1), "s": round(time.perf_counter() - started, 2)})
    previous = now
print(json.dumps({"steps": steps, "total_rss_mib": round(previous, 1), "scipy_imported": "scipy" in sys.modules}))
"""


def main() -> None:
    record = {"benchmark": "import_cost"}
    for variant in ("whole_hivemind", "lean"):
        output = subprocess.run([sys.executable, "-c", PROBE, variant, *MODULES], capture_output=True, text=True, check=True)
        record[variant] = json.loads(output.stdout.strip().splitlines()[-1])
    print(json.dumps(record))


if __name__ == "__main__":
    main()
