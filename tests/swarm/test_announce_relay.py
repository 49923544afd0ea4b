"""A server behind a TCP relay (``--port`` plus ``--announce-maddrs``): peers reach it through the announced
address only, and generation through it equals the local pipeline's."""

from __future__ import annotations

import pytest

from efedllm.client.config import RemoteClientConfig
from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.client.sampling import GenerationConfig
from efedllm.common.delay_relay import RelayProcess, free_port
from efedllm.server.swarm import LocalSwarm

pytestmark = pytest.mark.swarm
GREEDY = GenerationConfig(max_new_tokens=6, greedy=True, stop_on_eos=False)
PROMPT = "Name a large ocean."


def test_a_server_is_reached_through_its_announced_relay_and_only_through_it(local_pipeline):
    expected = local_pipeline.generate(local_pipeline.encode_prompt(PROMPT), GREEDY).token_ids
    port = free_port()
    with RelayProcess([port], delay_ms=2) as relay, LocalSwarm("smollm2-135m") as swarm:
        swarm.start_bootstrap()
        announced = f"/ip4/127.0.0.1/tcp/{relay.ports[0]}"
        server = swarm.start_server("0:30", extra=["--no-rebalance", "--port", str(port), "--announce-maddrs", announced])
        swarm.wait_until_online(1)
        assert [maddr.split("/p2p/")[0] for maddr in server.ready()["maddrs"]] == [announced]
        model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=swarm.initial_peers)
        try:
            assert model.generate(model.encode_prompt(PROMPT), GREEDY).token_ids == expected
        finally:
            model.shutdown()
        relay.stop()  # the server still runs and listens on its own port, which nobody was told
        cut_off = DistributedModelForCausalLM.from_pretrained(
            "smollm2-135m", initial_peers=swarm.initial_peers,
            config=RemoteClientConfig(request_timeout=5.0, max_retries=1, retry_delay=0.1))
        try:
            with pytest.raises(Exception, match="no usable server hosts block"):  # it was tried and could not be reached
                cut_off.generate(cut_off.encode_prompt(PROMPT), GREEDY)
            assert server.process.poll() is None and swarm.server_records()[0]  # still running and announced
        finally:
            cut_off.shutdown()
