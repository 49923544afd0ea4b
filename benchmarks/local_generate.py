"""Tokens/s of the 3-span local pipeline vs transformers' generate (64 greedy tokens, float32),
and the peak-RSS increase of loading 10 of 30 blocks vs the whole model. Prints one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers import GenerationConfig as TransformersGenerationConfig  # noqa: E402

from efedllm.client.local import LocalModelForCausalLM  # noqa: E402
from efedllm.client.sampling import GenerationConfig  # noqa: E402
from efedllm.common.spans import parse_spans  # noqa: E402
from efedllm.models.sources import resolve_model  # noqa: E402

MODEL, TOKENS, REPEATS = "smollm2-135m", 64, 5
PROMPT = "Write a short story about a lighthouse keeper."


def peak_increase(*arguments: str) -> float:
    output = subprocess.run([sys.executable, "-m", "efedllm.models.memory_probe", MODEL, *arguments],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_increase_mib"]


def best_rates(*generators) -> list[float]:
    """Best tokens/s of each generator over REPEATS runs, interleaved so that a noisy phase hits all alike."""
    for generate in generators:
        generate()  # warm-up
    rates = [[] for _ in generators]
    for _ in range(REPEATS):
        for generate, measured in zip(generators, rates):
            started = time.perf_counter()
            generate()
            measured.append(TOKENS / (time.perf_counter() - started))
    return [max(measured) for measured in rates]


def main() -> None:
    pipeline = LocalModelForCausalLM.load(MODEL, parse_spans("0:10,10:20,20:30"))
    input_ids = pipeline.encode_prompt(PROMPT)
    ours = GenerationConfig(max_new_tokens=TOKENS, greedy=True, stop_on_eos=False)
    path = resolve_model(MODEL).path
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    theirs = TransformersGenerationConfig(max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False, pad_token_id=2)
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        pipeline_rate, transformers_rate = best_rates(
            lambda: pipeline.generate(input_ids, ours),
            lambda: reference.generate(input_ids, attention_mask=mask, generation_config=theirs),
        )
    span_mib, whole_mib = peak_increase("0", "10"), peak_increase("0", "30", "--whole")
    print(json.dumps({
        "benchmark": "local_generate", "new_tokens": TOKENS, "dtype": "float32", "torch_threads": torch.get_num_threads(),
        "pipeline_3_spans_tokens_per_s": round(pipeline_rate, 2),
        "transformers_tokens_per_s": round(transformers_rate, 2),
        "pipeline_over_transformers": round(pipeline_rate / transformers_rate, 3),
        "peak_rss_increase_10_of_30_blocks_mib": round(span_mib, 1),
        "peak_rss_increase_whole_model_mib": round(whole_mib, 1),
        "rss_ratio": round(span_mib / whole_mib, 3),
    }))


if __name__ == "__main__":
    main()
