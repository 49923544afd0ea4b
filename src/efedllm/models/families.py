"""The registry of model families: a model's ``config.model_type`` -> its :class:`ModelFamily`.

Adding a family is one module beside :mod:`efedllm.models.llama` with a function that builds its
:class:`~efedllm.models.family.ModelFamily`, plus one entry in :data:`FAMILIES`, plus its parity
test in ``tests/unit/models/test_families.py`` (a tiny random model built from its config).
"""

from __future__ import annotations

from typing import Callable

from efedllm.models.family import ModelFamily
from efedllm.models.gemma3 import gemma3_family
from efedllm.models.llama import llama_family
from efedllm.models.mistral import mistral_family
from efedllm.models.mixtral import mixtral_family
from efedllm.models.qwen import qwen2_family, qwen3_family

FAMILIES: dict[str, Callable[[], ModelFamily]] = {
    "llama": llama_family,
    "qwen2": qwen2_family,
    "qwen3": qwen3_family,
    "mistral": mistral_family,
    "gemma3_text": gemma3_family,
    "mixtral": mixtral_family,
}


def family_for(model_type: str) -> ModelFamily:
    if model_type not in FAMILIES:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]()
