"""A fine-tuning run's pieces around :class:`~efedllm.client.training.TrainableCausalLM`: training text as
token chunks, seeded batches, held-out perplexity, a training loop, and the adapter file.

The adapter file is safetensors: every trainable tensor by name (``blocks.{b}.….lora_A``, ``prompts``) and,
in its metadata, what was trained (``method``, ``rank``, ``alpha``, ``targets``, ``prompts``) and the model.
Call order: ``read_texts`` -> ``token_chunks`` -> ``train_loop`` (``batches`` inside) -> ``save_adapter``;
``load_adapter`` gives a spec and tensors back for ``trainable(spec, tensors)``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from efedllm.models.adapters import AdapterSpec

ADAPTER_FORMAT = "efedllm-adapter/1"


def read_texts(path: Path) -> str:
    """A .txt file as it is, or a .jsonl file's ``text`` (or ``prompt`` + ``completion``) fields, one after another."""
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if text is None and isinstance(record, dict) and "prompt" in record:
                text = f"{record['prompt']}{record.get('completion', '')}"
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: needs a \"text\" string (or \"prompt\" and \"completion\")")
            texts.append(text)
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def token_chunks(ids: list[int], seq_len: int) -> torch.Tensor:
    """Consecutive non-overlapping chunks [chunks, seq_len] of ``ids`` (the remainder dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    count = len(ids) // seq_len
    if count == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[:count * seq_len], dtype=torch.long).view(count, seq_len)


def batches(chunks: torch.Tensor, batch: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` batches [batch, seq_len]: the chunks in a seeded shuffled order, reshuffled after each epoch."""
    order: list[int] = []
    rng = random.Random(seed)
    for _ in range(steps):
        while len(order) < batch:
            epoch = list(range(chunks.shape[0]))
            rng.shuffle(epoch)
            order.extend(epoch)
        yield chunks[order[:batch]]
        del order[:batch]


def perplexity(model, chunks: torch.Tensor, batch: int) -> float:
    """exp of the mean next-token loss over ``chunks`` [chunks, seq_len], without gradients."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, chunks.shape[0], batch):
            rows = chunks[start:start + batch]
            loss = model(rows, labels=rows).loss
            count = rows.shape[0] * (rows.shape[1] - 1)
            total, tokens = total + loss.item() * count, tokens + count
    return math.exp(total / tokens)


@dataclass
class TrainingLog:
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out perplexity)
    seconds: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def train_loop(model, chunks: torch.Tensor, steps: int, batch: int, lr: float, seed: int = 0, max_grad_norm: float = 1.0,
               eval_chunks: torch.Tensor | None = None, eval_every: int = 0,
               on_step: Callable[[int, float], None] | None = None) -> TrainingLog:
    """AdamW on the model's parameters with gradient clipping; the time counts training steps only."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    log = TrainingLog()
    for step, rows in enumerate(batches(chunks, batch, steps, seed), 1):
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = model(rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        log.seconds += time.perf_counter() - started
        log.tokens += rows.numel()
        log.losses.append(loss.item())
        if eval_chunks is not None and eval_every and step % eval_every == 0:
            log.evals.append((step, perplexity(model, eval_chunks, batch)))
        if on_step is not None:
            on_step(step, loss.item())
    return log


def save_adapter(path: Path, model, model_name: str) -> None:
    spec: AdapterSpec = model.spec
    metadata = {"format": ADAPTER_FORMAT, "model": model_name, "method": spec.method, "rank": str(spec.rank),
                "alpha": repr(spec.alpha), "targets": ",".join(spec.targets), "prompts": str(spec.prompts)}
    save_file({name: tensor.contiguous() for name, tensor in model.adapter_tensors().items()}, str(path), metadata)


def load_adapter(path: Path) -> tuple[AdapterSpec, dict[str, torch.Tensor], str]:
    """(what was trained, its tensors by name, ``prompts`` among them for prompt tuning, the model it was trained on)."""
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an efedllm adapter (format {metadata.get('format')!r})")
    spec = AdapterSpec(metadata["method"], int(metadata["rank"]), float(metadata["alpha"]),
                       tuple(filter(None, metadata["targets"].split(","))), int(metadata["prompts"]))
    return spec, load_file(str(path)), metadata["model"]
