"""Shared fixtures: the real default model, loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: it reads this once
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the efedllm CLI does (server/swarm.py)

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from efedllm.client.local import LocalModelForCausalLM  # noqa: E402
from efedllm.common.spans import parse_spans  # noqa: E402
from efedllm.models.span import load_client_parts, load_span  # noqa: E402
from efedllm.models.sources import resolve_model  # noqa: E402

MODEL = "smollm2-135m"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = PROJECT_ROOT.parent / "shared" / "data" / "wikitext2-test.raw"


def gguf_path() -> Path:
    return resolve_model(MODEL).path


@pytest.fixture(scope="session")
def reference_model():
    """transformers' own model of the same GGUF file (the ground truth for parity)."""
    path = gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def client_parts():
    return load_client_parts(MODEL)


@pytest.fixture(scope="session")
def full_span():
    return load_span(MODEL, 0, 30)


@pytest.fixture(scope="session")
def local_pipeline(client_parts):
    """The whole model in this process, as the swarms of the swarm and adversarial tests split it."""
    spans = parse_spans("0:10,10:20,20:30")
    return LocalModelForCausalLM(client_parts, [load_span(MODEL, span.start, span.end) for span in spans])

