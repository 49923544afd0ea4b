"""Import hivemind's networking without the parts of it efedllm does not use.

``import hivemind.dht`` first runs ``hivemind/__init__.py``, which imports hivemind's averaging,
mixture-of-experts and optimiser packages (and through them scipy.optimize). efedllm uses only
``hivemind.dht``, ``hivemind.p2p``, ``hivemind.utils``, ``hivemind.proto`` and ``hivemind.compression``,
which import nothing outside that set (checked in ``tests/unit/common/test_lean_imports.py``).
Registering the package object without running its ``__init__`` lets those submodules import as usual.

Measured (``benchmarks/import_cost.py``): hivemind.dht alone costs 13.7 MiB instead of 62.5, but a
server still imports scipy through transformers' modelling code, so the whole server import shrinks
only from 399 to 390 MiB: torch (~205 MiB) and transformers' masking and modelling modules (~150 MiB,
torch._dynamo among them) are the fixed cost, and neither can be left out while we use their layers.

Called by the ``efedllm`` command before it imports a command's module: a library user who imports
efedllm keeps hivemind exactly as it is.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

USED_SUBPACKAGES: tuple[str, ...] = ("dht", "p2p", "utils", "proto", "compression", "hivemind_cli")


def register_lean_hivemind() -> bool:
    """Put an un-initialised ``hivemind`` package in ``sys.modules``; False when hivemind is already imported."""
    if "hivemind" in sys.modules:
        return False
    spec = importlib.util.find_spec("hivemind")
    if spec is None or not spec.submodule_search_locations:
        return False
    package = importlib.util.module_from_spec(spec)  # its __path__ is set; its __init__ is not run
    package.__version__ = _installed_version()
    sys.modules["hivemind"] = package
    return True


def _installed_version() -> str:
    try:
        return importlib.metadata.version("hivemind")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
