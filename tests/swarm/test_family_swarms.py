"""Gemma 3 and Mixtral through a real 3-server swarm on 127.0.0.1 give transformers' own greedy tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.client.sampling import GenerationConfig
from efedllm.models.synthetic import TINY_VOCAB, tiny_config, write_checkpoint
from efedllm.server.swarm import LocalSwarm

pytestmark = [pytest.mark.swarm, pytest.mark.slow]
GREEDY = GenerationConfig(max_new_tokens=12, greedy=True, stop_on_eos=False)


@pytest.mark.parametrize("model_type", ["gemma3_text", "mixtral"])
def test_a_three_server_swarm_matches_transformers(tmp_path, model_type):
    directory = write_checkpoint(tiny_config(model_type), tmp_path / model_type)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    input_ids = torch.randint(0, TINY_VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))  # longer than a window
    with torch.no_grad():
        expected = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                      max_new_tokens=GREEDY.max_new_tokens, eos_token_id=None,
                                      pad_token_id=0)[0, input_ids.shape[1]:].tolist()
    with LocalSwarm(str(directory)) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:3", "3:6", "6:8"):  # Gemma 3's global block 5 in the middle server
            swarm.start_server(blocks, extra=["--no-rebalance"])
        swarm.wait_until_online(3, timeout=300)
        model = DistributedModelForCausalLM.from_pretrained(str(directory), initial_peers=swarm.initial_peers)
        try:
            assert model.generate(input_ids, GREEDY).token_ids == expected
        finally:
            model.shutdown()
