"""SVD compression on SmolLM2-135M: perplexity, retained energy, bytes and decode time per ratio C.

Prints one JSON line and writes ``benchmarks/svd.png`` (compression ratio vs retained energy vs
perplexity: the paper's Fig. 5 on a real model, with the perplexity the paper lacks).

Settings: WikiText-2 test (``../shared/data/wikitext2-test.raw``), first 8,192 tokens in 1,024-token
windows, float32. Plain = eq. 15's uniform rank per matrix (eq. 9's U, Σ, Vᵀ). Whitened = SVD-LLM whitening, ranks
allocated under one parameter budget over all 30 blocks (``allocation="loss"``: each matrix's
whitened output error weighed by its measured loss sensitivity, from one backward pass on 8 × 512
tokens drawn with seed 1), sequential calibration on 32 × 512 tokens drawn (seed 0); all windows
come from after token 65,536 of the same file (disjoint from the evaluation tokens). Whitened
matrices are stored in the interpolative form (k·(m+n−k) numbers, the default) and, for comparison
at the same budget, in eq. 9's form (``ppl_whitened_svd_form``).
Decode step: one token with a 128-token KV cache through a 10-block span, dense vs eq. 15 low-rank.
Transfer: the bytes ``--weights-from`` would send for blocks 0-9 against dense, both for those blocks
of the whole-model allocation (``transfer_ratio``: the allocation gives early blocks more than C)
and for the span compressed on its own at C, as a server does (``transfer_ratio_span_compressed_alone``).

Usage: python benchmarks/svd.py [--ratios 0.9,0.8,0.7,0.6] [--tokens 8192] [--png PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from efedllm.compression.apply import CompressionConfig, compress_layers, whitened_spectra
from efedllm.compression.calibration import calibration_token_ids, projection_sensitivities, span_layer_runner
from efedllm.compression.perplexity import default_text_path, read_text, tokenize, windowed_perplexity
from efedllm.compression.transfer import pack_layers, transfer_size
from efedllm.models.span import load_client_parts, load_span
from efedllm.common.spans import Span

MODEL = "smollm2-135m"
DECODE_BLOCKS = 10
DECODE_CONTEXT = 128
DECODE_REPEATS = 30


def _perplexity(client, body, token_ids, tokens: int) -> float:
    return windowed_perplexity(lambda ids: client.logits(body(client.embed(ids))), token_ids, 1024, tokens).perplexity


def _decode_step_ms(spans: dict, hidden_size: int) -> dict:
    """Median time of one decode step (1 token, a 128-token cache) through each span, measured interleaved."""
    generator = torch.Generator().manual_seed(0)
    times = {name: [] for name in spans}
    with torch.no_grad():
        for repeat in range(DECODE_REPEATS + 3):
            for name, span in spans.items():
                cache = span.new_cache()
                span(torch.randn(1, DECODE_CONTEXT, hidden_size, generator=generator), position=0, cache=cache)
                step = torch.randn(1, 1, hidden_size, generator=generator)
                start = time.perf_counter()
                span(step, position=DECODE_CONTEXT, cache=cache)
                if repeat >= 3:  # warm-up
                    times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def _ratio_row(ratio, client, body, spectra, sensitivities, calibration, token_ids, tokens, decode_span) -> dict:
    hidden_size = client.config.hidden_size
    plain_body = copy.deepcopy(body)
    plain = compress_layers(plain_body.layers, CompressionConfig(ratio=ratio, method="plain", allocation="uniform", factor_form="svd"))
    plain_ppl = _perplexity(client, plain_body, token_ids, tokens)
    del plain_body
    svd_form_body = copy.deepcopy(body)
    svd_form = CompressionConfig(ratio=ratio, method="whitened", allocation="loss", factor_form="svd")
    compress_layers(svd_form_body.layers, svd_form, calibration, span_layer_runner(svd_form_body), spectra, sensitivities)
    svd_form_ppl = _perplexity(client, svd_form_body, token_ids, tokens)
    del svd_form_body
    white_body = copy.deepcopy(body)
    config = CompressionConfig(ratio=ratio, method="whitened", allocation="loss")
    started = time.perf_counter()
    whitened = compress_layers(white_body.layers, config, calibration, span_layer_runner(white_body), spectra, sensitivities)
    compress_s = time.perf_counter() - started
    whitened_ppl = _perplexity(client, white_body, token_ids, tokens)
    transfer = transfer_size(white_body.layers[:DECODE_BLOCKS])
    uniform_span = copy.deepcopy(decode_span)
    compress_layers(uniform_span.layers, CompressionConfig(ratio=ratio, method="plain", allocation="uniform", factor_form="svd"))
    allocated_span = copy.deepcopy(decode_span)
    allocated_span.layers = white_body.layers[:DECODE_BLOCKS]
    return {
        "ratio": ratio,
        "ppl_plain": round(plain_ppl, 2),
        "ppl_whitened": round(whitened_ppl, 2),
        "ppl_whitened_svd_form": round(svd_form_ppl, 2),
        "energy_plain": round(plain.mean_retained_energy, 4),
        "energy_whitened_alloc": round(whitened.mean_retained_energy, 4),
        "achieved_ratio_whitened": round(whitened.achieved_ratio, 4),
        "dense_kept_whitened": sum(report.rank is None for report in whitened.matrices),
        "span_weight_bytes_plain": plain.nbytes,
        "span_weight_bytes_whitened": whitened.nbytes,
        "whitened_compress_s": round(compress_s, 1),
        "transfer_bytes_10_blocks": transfer.payload_bytes,
        "transfer_dense_bytes_10_blocks": transfer.dense_bytes,
        "transfer_ratio": round(transfer.ratio, 4),
        "transfer_ratio_span_compressed_alone": round(len(pack_layers(uniform_span.layers, 0)) / transfer.dense_bytes, 4),
        **{f"decode_ms_{name}": round(value, 3) for name, value in _decode_step_ms(
            {"dense": decode_span, "lowrank_uniform": uniform_span, "lowrank_allocated": allocated_span}, hidden_size).items()},
    }


def _plot(rows: list[dict], baseline: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [row["ratio"] for row in rows]
    figure, (energy_axis, ppl_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    energy_axis.plot(ratios, [row["energy_plain"] for row in rows], "o-", label="plain SVD (eq. 15 ranks)")
    energy_axis.plot(ratios, [row["energy_whitened_alloc"] for row in rows], "s-", label="whitened, allocated ranks")
    energy_axis.set(xlabel="compression ratio C (eq. 10)", ylabel="mean retained energy (eq. 12)", title="Energy kept (paper Fig. 5)")
    ppl_axis.semilogy(ratios, [row["ppl_plain"] for row in rows], "o-", label="plain SVD")
    ppl_axis.semilogy(ratios, [row["ppl_whitened_svd_form"] for row in rows], "^-", label="whitened + loss-weighted, eq. 9 form")
    ppl_axis.semilogy(ratios, [row["ppl_whitened"] for row in rows], "s-", label="whitened + loss-weighted, interpolative form")
    ppl_axis.axhline(baseline, color="gray", linestyle="--", label=f"uncompressed ({baseline:.1f})")
    ppl_axis.set(xlabel="compression ratio C (eq. 10)", ylabel="WikiText-2 perplexity (log)", title="Perplexity (SmolLM2-135M)")
    for axis in (energy_axis, ppl_axis):
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.9,0.8,0.7,0.6")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("svd.png"))
    args = parser.parse_args(argv)
    text = default_text_path(Path(__file__).resolve().parents[1])
    if text is None:
        print("benchmarks/svd.py needs ../shared/data/wikitext2-test.raw", file=sys.stderr)
        return 2
    client = load_client_parts(MODEL)
    body = load_span(MODEL, 0, client.config.num_hidden_layers)
    token_ids = tokenize(client.tokenizer, read_text(text))
    baseline = _perplexity(client, body, token_ids, args.tokens)
    calibration_config = replace(CompressionConfig(ratio=0.9), calibration_text=text)
    with torch.no_grad():
        calibration = client.embed(calibration_token_ids(client.tokenizer, calibration_config))
    spectra = whitened_spectra(body.layers, calibration, span_layer_runner(body))
    started = time.perf_counter()
    sensitivities = projection_sensitivities(client, body, Span(0, client.config.num_hidden_layers), calibration_config)
    sensitivity_s = time.perf_counter() - started
    decode_span = load_span(MODEL, 0, DECODE_BLOCKS)
    print(f"uncompressed perplexity {baseline:.2f}", file=sys.stderr, flush=True)
    rows = []
    for ratio in args.ratios.split(","):
        rows.append(_ratio_row(float(ratio), client, body, spectra, sensitivities, calibration, token_ids, args.tokens, decode_span))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress: a long run shows each ratio as it ends
    _plot(rows, baseline, args.png)
    print(json.dumps({"benchmark": "svd", "model": MODEL, "tokens": args.tokens, "window": 1024, "ppl_uncompressed": round(baseline, 2),
                      "calibration": "32x512 tokens after token 65536, seed 0", "allocation": "loss", "factor_form": "interpolative",
                      "sensitivity": "8x512 tokens after token 65536, seed 1", "sensitivity_s": round(sensitivity_s, 1), "rows": rows, "png": str(args.png)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
