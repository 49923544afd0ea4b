"""The registry of model families: a model's ``config.model_type`` -> its :class:`ModelFamily`.

Adding a family is one module beside :mod:`efedllm.models.llama` with a function that builds its
:class:`~efedllm.models.family.ModelFamily`, plus one entry in :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Callable

from efedllm.models.family import ModelFamily
from efedllm.models.llama import llama_family

FAMILIES: dict[str, Callable[[], ModelFamily]] = {"llama": llama_family}


def family_for(model_type: str) -> ModelFamily:
    if model_type not in FAMILIES:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]()
