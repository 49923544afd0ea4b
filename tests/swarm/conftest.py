"""Fixtures that start real hivemind peers on 127.0.0.1 and clean every process up."""

from __future__ import annotations

import pytest

from efedllm.api.app import ApiServer
from efedllm.api.config import ApiConfig
from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.server.swarm import LocalSwarm


@pytest.fixture(scope="package")
def swarm():
    with LocalSwarm("smollm2-135m") as local_swarm:
        local_swarm.start_bootstrap()
        for blocks in ("0:10", "10:20", "20:30"):
            local_swarm.start_server(blocks, extra=["--no-rebalance", "--metrics-port", "0"])
        local_swarm.wait_until_online(3)
        yield local_swarm


@pytest.fixture
def remote_model(swarm):
    model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=swarm.initial_peers)
    yield model
    model.shutdown()


@pytest.fixture(scope="module")
def api(swarm):
    """An OpenAI-compatible API over the package's swarm, on a free port of 127.0.0.1 (``api.url``)."""
    server = ApiServer(ApiConfig(model="smollm2-135m", initial_peers=tuple(swarm.initial_peers), port=0,
                                 probe_interval=2.0)).start()
    yield server
    server.shutdown()
