"""Models larger than one server: random-weight models of real large shapes across 3 servers.

Shapes (built from a config offline, never downloaded):
- ``llama3-8b``: Llama-3-8B's shape (32 blocks, hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab 128256).
- ``mixtral-4x``: Mixtral-8x7B's block shape (hidden 4096, experts' MLP 14336, 8 KV heads, top-2 routing)
  with 4 experts and ``--mixtral-blocks`` blocks (default 6), so that it fits the disk and memory here.

Each is written once as bfloat16 safetensors (one file per block, random N(0, 0.02²) weights) under
``--cache-dir`` (default ``~/.cache/efedllm/large-models``) and reused by later runs. Then, per
format (``bfloat16``, ``int8``: int8 weights, bfloat16 compute), 3 real ``efedllm serve`` processes
on 127.0.0.1 hold a third of the blocks each; a client (bfloat16 embeddings and head in this
process) generates ``--tokens`` greedy tokens through them.

Per server: its peak RSS (VmHWM) against its share of the weight bytes in that format (what its
span's tensors take) and the bound ``1.2 × share + 400 MiB``; per run: load time (start until all
three are online), tokens/s, and the whole model's weight bytes against this machine's memory.
Prints one JSON line.

Usage: python benchmarks/large_model.py [--models llama3-8b mixtral-4x] [--formats int8 bfloat16] [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, MixtralConfig  # noqa: E402

from efedllm.client.config import RemoteClientConfig  # noqa: E402
from efedllm.client.remote import DistributedModelForCausalLM  # noqa: E402
from efedllm.client.sampling import GenerationConfig  # noqa: E402
from efedllm.models.synthetic import tiny_tokenizer  # noqa: E402
from efedllm.server.swarm import LocalSwarm  # noqa: E402

MIB = 2**20
FORMATS = {"bfloat16": [], "int8": ["--quant", "int8"]}
SHARED = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
          "head_dim": 128, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "rope_theta": 500000.0,
          "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}


def model_config(name: str, mixtral_blocks: int):
    if name == "llama3-8b":
        return LlamaConfig(**SHARED, num_hidden_layers=32, vocab_size=128256)
    if name == "mixtral-4x":
        return MixtralConfig(**{**SHARED, "rope_theta": 1e6}, num_hidden_layers=mixtral_blocks, vocab_size=32000,
                             num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    raise ValueError(f"unknown model {name!r}")


def block_shapes(config) -> dict[str, tuple[int, ...]]:
    """Checkpoint name (inside a block) -> shape, as Hugging Face checkpoints store them."""
    hidden, inner = config.hidden_size, config.intermediate_size
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
              "self_attn.q_proj.weight": (heads * head_dim, hidden), "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
              "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), "self_attn.o_proj.weight": (hidden, heads * head_dim)}
    if config.model_type == "mixtral":
        shapes["block_sparse_moe.gate.weight"] = (config.num_local_experts, hidden)
        for expert in range(config.num_local_experts):
            prefix = f"block_sparse_moe.experts.{expert}."
            shapes |= {prefix + "w1.weight": (inner, hidden), prefix + "w3.weight": (inner, hidden), prefix + "w2.weight": (hidden, inner)}
    else:
        shapes |= {"mlp.gate_proj.weight": (inner, hidden), "mlp.up_proj.weight": (inner, hidden), "mlp.down_proj.weight": (hidden, inner)}
    return shapes


def _random(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)  # norms
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def write_model(config, directory: Path) -> float:
    """Write the checkpoint block by block (skipped when complete); returns the seconds it took."""
    if (directory / "complete").is_file():
        return 0.0
    started, generator = time.perf_counter(), torch.Generator().manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    for block in range(config.num_hidden_layers):
        tensors = {f"model.layers.{block}.{name}": _random(shape, generator) for name, shape in block_shapes(config).items()}
        save_file(tensors, directory / f"block-{block:03d}.safetensors")
        del tensors
    outer = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size), "model.norm.weight": (config.hidden_size,),
             "lm_head.weight": (config.vocab_size, config.hidden_size)}
    save_file({name: _random(shape, generator) for name, shape in outer.items()}, directory / "outer.safetensors")
    config.save_pretrained(directory)
    tiny_tokenizer(min(config.vocab_size, 49152)).save_pretrained(directory)
    (directory / "complete").write_text("ok")
    return time.perf_counter() - started


def block_bytes(config, quant: bool) -> int:
    """Bytes one block's tensors take in memory: bfloat16, or int8 projections with a bfloat16 scale per row
    (norms and a mixture's router stay bfloat16)."""
    total = 0
    for name, shape in block_shapes(config).items():
        elements = int(torch.tensor(shape).prod())
        projection = len(shape) == 2 and not name.endswith("moe.gate.weight")
        total += elements + 2 * shape[0] if quant and projection else 2 * elements
    return total


def split(blocks: int, parts: int = 3) -> list[tuple[int, int]]:
    edges = [round(blocks * index / parts) for index in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve_and_generate(directory: Path, config, fmt: str, tokens: int, threads: int) -> dict:
    spans, per_block = split(config.num_hidden_layers), block_bytes(config, fmt == "int8")
    extra = ["--no-rebalance", "--dtype", "bfloat16", "--torch-threads", str(threads), "--max-sessions", "2",
             *FORMATS[fmt]]
    with LocalSwarm(str(directory)) as swarm:
        swarm.start_bootstrap()
        started = time.perf_counter()
        for start, end in spans:
            swarm.start_server(f"{start}:{end}", extra=extra)
        swarm.wait_until_online(3, timeout=1800)
        load_s = time.perf_counter() - started
        client = DistributedModelForCausalLM.from_pretrained(str(directory), swarm.initial_peers,
                                                             RemoteClientConfig(dtype="bfloat16"))
        try:
            result = client.generate(torch.tensor([[1, 450, 3681, 310, 3444]]),
                                     GenerationConfig(max_new_tokens=tokens, greedy=True, stop_on_eos=False))
        finally:
            client.shutdown()
        servers = []
        for (start, end), server in zip(spans, swarm.servers):
            share = per_block * (end - start) / MIB
            peak = peak_rss_mib(server.process.pid)
            bound = 1.2 * share + 400
            servers.append({"blocks": f"{start}:{end}", "weight_share_mib": round(share, 1), "peak_rss_mib": round(peak, 1),
                            "bound_mib": round(bound, 1), "within_bound": peak <= bound,
                            "peak_minus_share_mib": round(peak - share, 1)})
    return {"format": fmt, "load_s": round(load_s, 1), "tokens_per_s": round(result.tokens_per_s, 3),
            "new_tokens": result.new_tokens, "servers": servers}


def machine_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["llama3-8b", "mixtral-4x"], choices=["llama3-8b", "mixtral-4x"])
    parser.add_argument("--formats", nargs="+", default=["int8", "bfloat16"], choices=list(FORMATS))
    parser.add_argument("--tokens", type=int, default=4, help="greedy tokens generated through the swarm")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--mixtral-blocks", type=int, default=6)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "efedllm" / "large-models")
    args = parser.parse_args()
    if min(args.tokens, args.server_threads, args.mixtral_blocks) < 1:
        parser.error("--tokens, --server-threads and --mixtral-blocks must be at least 1")
    record = {"benchmark": "large_model", "machine_memory_bytes": machine_memory_bytes(), "models": {}}
    for name in args.models:
        config = model_config(name, args.mixtral_blocks)
        directory = args.cache_dir / (name if name != "mixtral-4x" else f"{name}-{args.mixtral_blocks}")
        write_s = write_model(config, directory)
        weights = {fmt: config.num_hidden_layers * block_bytes(config, fmt == "int8") for fmt in args.formats}
        entry = {"blocks": config.num_hidden_layers, "written_s": round(write_s, 1),
                 "checkpoint_bytes": sum(f.stat().st_size for f in directory.glob("*.safetensors")),
                 "block_weight_bytes": weights,
                 "block_weight_bytes_over_machine_memory": {fmt: round(size / record["machine_memory_bytes"], 3)
                                                           for fmt, size in weights.items()},
                 "runs": [serve_and_generate(directory, config, fmt, args.tokens, args.server_threads) for fmt in args.formats]}
        record["models"][name] = entry
    print(json.dumps(record))


if __name__ == "__main__":
    main()
