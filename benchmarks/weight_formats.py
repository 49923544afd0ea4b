"""Weight formats on servers (float32, bfloat16, int8 weights with float32 or bfloat16 compute), SmolLM2-135M.

Per format: the weight bytes of a 10-of-30-block span, the peak RSS of a real ``efedllm serve`` process
holding blocks 0:10 (a 3-server swarm 0:10, 10:20, 20:30, measured after a 32-token greedy generation
through it), the decode step time of that span in this process (one token after a 64-token prompt;
formats taken in turn, ``--steps`` rounds, median, at 1 torch thread and at this machine's cores), and
WikiText-2 perplexity of the whole model in that format against float32 (``efedllm eval-ppl``'s
defaults: the first 8192 tokens in windows of 1024).

It also measures what keeping the GGUF file's own quantised blocks in memory would cost: their bytes
for the span, and the time to dequantise them (gguf's ``dequantize``, what a server would have to do
for every step without a fused quantised-matmul kernel, which torch has no CPU op for).

Usage: python benchmarks/weight_formats.py [--steps N] [--skip-perplexity] [--skip-servers]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType, dequantize  # noqa: E402

from efedllm.client.local import LocalModelForCausalLM  # noqa: E402
from efedllm.client.remote import DistributedModelForCausalLM  # noqa: E402
from efedllm.client.config import RemoteClientConfig  # noqa: E402
from efedllm.client.sampling import GenerationConfig  # noqa: E402
from efedllm.cli.eval_ppl import evaluate_model  # noqa: E402
from efedllm.compression.perplexity import default_text_path  # noqa: E402
from efedllm.models.sources import resolve_model  # noqa: E402
from efedllm.models.span import load_span  # noqa: E402
from efedllm.models.weights import open_model  # noqa: E402
from efedllm.server.swarm import LocalSwarm  # noqa: E402

MODEL, SPAN = "smollm2-135m", (0, 10)
FORMATS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None),
           "float32+int8": ("float32", "int8"), "bfloat16+int8": ("bfloat16", "int8")}
PROMPT = "Write a short story about a lighthouse keeper."


def state_bytes(module: torch.nn.Module) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in module.state_dict().values())


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def decode_step_ms(spans: dict, steps: int, threads: int) -> dict[str, float]:
    """Median time of one decode step of each span (a 64-token prefill, then 1 token), formats in turn."""
    previous, times = torch.get_num_threads(), {name: [] for name in spans}
    torch.set_num_threads(threads)
    try:
        prompt = torch.randn(1, 64, 576, generator=torch.Generator().manual_seed(0))
        for _ in range(steps):
            for name, span in spans.items():
                with torch.inference_mode():
                    cache = span.new_cache()
                    span(prompt.to(span.dtype), 0, cache)
                    token = prompt[:, -1:].to(span.dtype)
                    start = time.perf_counter()
                    span(token, 64, cache)
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {name: round(statistics.median(values) * 1e3, 3) for name, values in times.items()}


def server_peak_rss(formats: list[str]) -> dict[str, dict]:
    """Per format: peak RSS of each of 3 real servers after a 32-token generation through them."""
    result, config = {}, GenerationConfig(max_new_tokens=32, greedy=True, stop_on_eos=False)
    for name in formats:
        dtype, quant = FORMATS[name]
        extra = ["--no-rebalance", "--torch-threads", "1", "--dtype", dtype, *(["--quant", quant] if quant else [])]
        with LocalSwarm(MODEL) as swarm:
            swarm.start_bootstrap()
            for blocks in ("0:10", "10:20", "20:30"):
                swarm.start_server(blocks, extra=extra)
            swarm.wait_until_online(3)
            client = DistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers, RemoteClientConfig(dtype=dtype))
            try:
                generated = client.generate(client.encode_prompt(PROMPT), config)
            finally:
                client.shutdown()
            result[name] = {"peak_rss_mib_by_server": [peak_rss_mib(server.process.pid) for server in swarm.servers],
                            "tokens_per_s_3_servers": round(generated.tokens_per_s, 2), "token_ids": generated.token_ids}
    return result


def gguf_blocks_in_memory(steps: int) -> dict:
    """Bytes of span 0:10's tensors as the GGUF file stores them, and the time to dequantise them all."""
    source = resolve_model(MODEL)
    _, _, reader = open_model(source)
    index = reader._gguf_index()
    names = [name for name in index if any(name.startswith(f"blk.{block}.") for block in range(*SPAN))]
    raws = [(np.memmap(source.path, dtype=index[name]["dtype"], mode="r", offset=index[name]["offset"],
                       shape=tuple(index[name]["shape"])), GGMLQuantizationType(index[name]["type"])) for name in names]
    stored = sum(raw.nbytes for raw, _ in raws)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for raw, kind in raws:
            dequantize(raw, kind)
        times.append(time.perf_counter() - start)
    kinds = sorted({kind.name for _, kind in raws})
    return {"stored_types": kinds, "stored_bytes": stored, "dequantize_span_ms_median": round(statistics.median(times) * 1e3, 1)}


def perplexities(formats: list[str]) -> dict[str, float]:
    text = Path(default_text_path())
    return {name: round(evaluate_model(MODEL, text, None, 8192, 1024, *FORMATS[name])[0].perplexity, 3) for name in formats}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30, help="decode steps per format (taken in turn)")
    parser.add_argument("--skip-perplexity", action="store_true")
    parser.add_argument("--skip-servers", action="store_true")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    spans = {name: load_span(MODEL, *SPAN, *FORMATS[name]) for name in FORMATS}
    weight_bytes = {name: state_bytes(span) for name, span in spans.items()}
    steps = {f"{threads}_threads": decode_step_ms(spans, args.steps, threads) for threads in sorted({1, os.cpu_count()})}
    del spans
    record = {
        "benchmark": "weight_formats", "model": MODEL, "span": f"{SPAN[0]}:{SPAN[1]}", "formats": list(FORMATS),
        "weight_bytes": weight_bytes,
        "weight_bytes_over_float32": {name: round(size / weight_bytes["float32"], 4) for name, size in weight_bytes.items()},
        "decode_step_ms": steps,
        "gguf_blocks_kept_quantised": gguf_blocks_in_memory(min(args.steps, 5)),
    }
    if not args.skip_servers:
        servers = server_peak_rss(list(FORMATS))
        record["servers"] = {name: {key: value for key, value in entry.items() if key != "token_ids"} for name, entry in servers.items()}
        reference = servers["float32"]["token_ids"]
        record["same_tokens_as_float32"] = {name: entry["token_ids"] == reference for name, entry in servers.items()}
    if not args.skip_perplexity:
        ppl = perplexities(list(FORMATS))
        record["wikitext2_perplexity"] = ppl
        record["perplexity_over_float32"] = {name: round(value / ppl["float32"], 4) for name, value in ppl.items()}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
