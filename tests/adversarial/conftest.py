"""Real peers on 127.0.0.1 for the attacks of issue 15: an honest swarm, a lying server, an honest client, an attacker."""

from __future__ import annotations

import pytest

from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.server.swarm import LocalSwarm

LIAR_THROUGHPUT = 1e6  # honest servers here measure ~25-80 tokens/s


@pytest.fixture(scope="package")
def swarm():
    with LocalSwarm("smollm2-135m") as local_swarm:
        local_swarm.start_bootstrap()
        for blocks in ("0:10", "10:20", "20:30"):
            local_swarm.start_server(blocks, extra=["--no-rebalance", "--torch-threads", "1"])
        local_swarm.start_server("0:10", extra=["--no-rebalance", "--torch-threads", "1",
                                                "--fault", f"announce:{LIAR_THROUGHPUT:g}"])
        local_swarm.wait_until_online(4)
        yield local_swarm


@pytest.fixture(scope="package")
def honest(swarm):
    model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=swarm.initial_peers)
    yield model
    model.shutdown()


@pytest.fixture(scope="package")
def attacker(swarm):
    """A peer of its own (its own identity, DHT node and streams) that attacks instead of generating."""
    model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=swarm.initial_peers)
    yield model
    model.shutdown()
