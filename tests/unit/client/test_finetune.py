"""A fine-tuning run's pieces (client/finetune.py) and ``efedllm finetune --local`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from efedllm.client.finetune import batches, load_adapter, read_texts, token_chunks
from efedllm.models.adapters import AdapterSpec


def test_texts_chunks_and_seeded_batches(tmp_path):
    lines = tmp_path / "data.jsonl"
    lines.write_text('{"text": "one"}\n\n{"prompt": "Q: ", "completion": "A"}\n', encoding="utf-8")
    assert read_texts(lines) == "one\n\nQ: A"
    lines.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.jsonl:1: needs a \"text\" string"):
        read_texts(lines)
    lines.write_text("not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="data.jsonl:1: not JSON"):
        read_texts(lines)
    chunks = token_chunks(list(range(10)), 3)
    assert chunks.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="fewer than one sequence of 32"):
        token_chunks(list(range(10)), 32)
    drawn = [rows.tolist() for rows in batches(chunks, 2, 3, seed=4)]
    assert drawn == [rows.tolist() for rows in batches(chunks, 2, 3, seed=4)]  # seeded
    seen = [row[0] for rows in drawn for row in rows]
    assert sorted(seen[:3]) == [0, 3, 6]  # every chunk once per epoch


def run_cli(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "efedllm.cli", "finetune", *arguments], capture_output=True, text=True,
                          timeout=600)


def test_finetune_local_saves_an_adapter_that_loads_and_continues(tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("The lighthouse keeper counted the ships. " * 40, encoding="utf-8")
    save = tmp_path / "out" / "adapter.safetensors"
    done = run_cli("--local", "--data", str(data), "--eval-file", str(data), "--eval-chunks", "2", "--steps", "4",
                   "--batch", "2", "--seq-len", "32", "--lr", "5e-3", "--method", "deep-ptune", "--prompts", "2",
                   "--save", str(save))
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["method"] == "deep-ptune" and record["eval_perplexity_after"] < record["eval_perplexity_before"]
    assert (tmp_path / "out" / "adapter.loss.png").stat().st_size > 1000
    spec, tensors, model = load_adapter(save)
    assert spec == AdapterSpec("deep-ptune", prompts=2) and model == "smollm2-135m"
    assert tensors["prompts"].shape == (2, 576) and tensors["blocks.29.prompts"].shape == (2, 576)
    assert record["trainable_parameters"] == sum(tensor.numel() for tensor in tensors.values())
    assert not torch.equal(tensors["blocks.0.prompts"], torch.zeros(2, 576))


def test_finetune_bad_arguments_are_named(tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("x " * 50, encoding="utf-8")
    cases = {("--local", "--data", str(tmp_path / "none.txt"), "--save", "a.safetensors"): "no such file",
             ("--data", str(data), "--save", "a.safetensors"): "give --initial-peers of a swarm, or --local",
             ("--local", "--data", str(data), "--save", "a.bin"): "--save must name a .safetensors file",
             ("--local", "--data", str(data), "--save", "a.safetensors", "--eval-every", "2"): "--eval-every needs --eval-file",
             ("--local", "--data", str(data), "--save", "a.safetensors", "--method", "full"): "invalid choice"}
    for arguments, expected in cases.items():
        done = run_cli(*arguments)
        assert done.returncode != 0 and expected in done.stderr, (arguments, done.stderr)


def run_efedllm(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "efedllm.cli", *arguments], capture_output=True, text=True, timeout=600)


def test_generate_and_eval_ppl_take_the_adapter_and_name_a_bad_one(tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("The lighthouse keeper counted the ships. " * 40, encoding="utf-8")
    save = tmp_path / "adapter.safetensors"
    done = run_cli("--local", "--data", str(data), "--steps", "4", "--batch", "2", "--seq-len", "32", "--lr", "2e-2",
                   "--method", "lora", "--rank", "2", "--save", str(save))
    assert done.returncode == 0, done.stderr
    ppl = {}
    for name, extra in (("adapted", ["--adapter", str(save)]), ("base", [])):
        done = run_efedllm("eval-ppl", "--text", str(data), "--tokens", "128", "--window", "64", "--json", *extra)
        assert done.returncode == 0, done.stderr
        ppl[name] = json.loads(done.stdout.strip().splitlines()[-1])["perplexity"]
    assert ppl["adapted"] < ppl["base"]  # it learnt the text it was trained on
    done = run_efedllm("generate", "--local", "--adapter", str(save), "--greedy", "--max-new-tokens", "3", "--json",
                       "--no-chat", "The lighthouse keeper")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["adapter"] == "lora" and record["new_tokens"] == 3
    spec, tensors, _ = load_adapter(save)
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, str(foreign), {"format": "efedllm-adapter/1", "model": "other-model", "method": "lora", "rank": "2",
                                      "alpha": "4.0", "targets": "q_proj", "prompts": "0"})
    cases = {("generate", "--local", "--adapter", str(tmp_path / "none.safetensors"), "Hi"): "no such file",
             ("generate", "--local", "--adapter", str(foreign), "Hi"): "was trained on other-model",
             ("eval-ppl", "--text", str(data), "--initial-peers", "/ip4/127.0.0.1/tcp/4000/p2p/"
              "QmXfptdHU6hqG95JswxYVUH4bphcK8y18mhFcgUQFe6fCN"): "--initial-peers goes with --adapter"}
    for arguments, expected in cases.items():
        done = run_efedllm(*arguments)
        assert done.returncode != 0 and expected in done.stderr, (arguments, done.stderr)
