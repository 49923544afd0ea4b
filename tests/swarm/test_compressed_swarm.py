"""A swarm serving SVD-compressed spans computes what the local pipeline computes with the same setting."""

from __future__ import annotations

import pytest

from efedllm.client.local import LocalModelForCausalLM
from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.client.sampling import GenerationConfig
from efedllm.common.spans import parse_spans
from efedllm.compression.apply import CompressionConfig
from efedllm.compression.calibration import compress_span
from efedllm.server.swarm import LocalSwarm

pytestmark = [pytest.mark.swarm, pytest.mark.slow]
# whitened SVD with globally allocated ranks (the defaults); a small calibration keeps the test short
FLAGS = ["--svd-ratio", "0.9", "--calibration-samples", "4", "--calibration-length", "128"]
CONFIG = CompressionConfig(ratio=0.9, calibration_samples=4, calibration_length=128)


def test_compressed_swarm_matches_compressed_local_pipeline():
    spans = parse_spans("0:10,10:20,20:30")
    local = LocalModelForCausalLM.load("smollm2-135m", spans, transform=lambda span: compress_span(span, "smollm2-135m", CONFIG))
    greedy = GenerationConfig(max_new_tokens=24, greedy=True, stop_on_eos=False)
    input_ids = local.encode_prompt("Name three colours of the rainbow.")
    expected = local.generate(input_ids, greedy).token_ids
    with LocalSwarm("smollm2-135m") as swarm:
        swarm.start_bootstrap()
        for span in spans:
            swarm.start_server(str(span), extra=["--no-rebalance", *FLAGS])
        swarm.wait_until_online(3, timeout=600)
        model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=swarm.initial_peers)
        try:
            assert model.generate(input_ids, greedy).token_ids == expected
        finally:
            model.shutdown()
