"""The registry of model families: a model's ``config.model_type`` -> its :class:`ModelFamily`.

Adding a family is one module beside :mod:`efedllm.models.llama` with a function that builds its
:class:`~efedllm.models.family.ModelFamily`, plus one entry (``"module:function"``) in :data:`FAMILIES`, plus its parity
test in ``tests/unit/models/test_families.py`` (a tiny random model built from its config).
"""

from __future__ import annotations

import importlib

from efedllm.models.family import ModelFamily

# model type -> "module:function" building its family; imported on first use, so that a process serving
# one family does not import (and hold) every other family's transformers modules
FAMILIES: dict[str, str] = {
    "llama": "efedllm.models.llama:llama_family",
    "qwen2": "efedllm.models.qwen:qwen2_family",
    "qwen3": "efedllm.models.qwen:qwen3_family",
    "mistral": "efedllm.models.mistral:mistral_family",
    "gemma3_text": "efedllm.models.gemma3:gemma3_family",
    "mixtral": "efedllm.models.mixtral:mixtral_family",
}


def family_for(model_type: str) -> ModelFamily:
    if model_type not in FAMILIES:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    module, _, function = FAMILIES[model_type].partition(":")
    return getattr(importlib.import_module(module), function)()
