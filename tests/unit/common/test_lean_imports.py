"""The efedllm command imports hivemind's networking without its averaging, MoE and optimiser packages."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
from efedllm.common.lean_imports import register_lean_hivemind
first, second = register_lean_hivemind(), register_lean_hivemind()
import hivemind.dht, hivemind.p2p, hivemind.utils, hivemind.proto, hivemind.compression
import efedllm.server.server, efedllm.client.remote, efedllm.verifier.node
from hivemind.dht import DHT
skipped = [name for name in sys.modules if name.split(".")[:2] in (["hivemind", "averaging"], ["hivemind", "moe"], ["hivemind", "optim"])]
print(json.dumps({"first": first, "second": second, "skipped_but_imported": skipped, "version": sys.modules["hivemind"].__version__,
                  "dht": DHT.__module__}))
"""


def test_hivemind_submodules_import_without_its_package_init():
    output = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    assert result["first"] is True and result["second"] is False  # registered once, then left alone
    assert result["skipped_but_imported"] == []  # nothing efedllm uses pulls the skipped packages back in
    assert result["version"] == "1.1.12" and result["dht"].startswith("hivemind.dht")


def test_an_already_imported_hivemind_is_left_as_it_is():
    import hivemind.dht  # noqa: F401  (this test process imports hivemind normally)

    from efedllm.common.lean_imports import register_lean_hivemind

    assert register_lean_hivemind() is False
