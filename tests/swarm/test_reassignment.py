"""The paper's reassignment: once a verifier deactivates the only server of a span, an honest server
that trusts the verifier moves there, and clients get correct tokens again."""

from __future__ import annotations

import time

import pytest

from efedllm.client.config import RemoteClientConfig
from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.client.sampling import GenerationConfig
from efedllm.common.spans import Span
from efedllm.dht.records import ServerState
from efedllm.server.swarm import LocalSwarm, peer_id_of
from efedllm.verifier.config import VerifierConfig
from efedllm.verifier.node import Verifier, VerifierNodeConfig

pytestmark = [pytest.mark.swarm, pytest.mark.slow]
MODEL = "smollm2-135m"
GREEDY = GenerationConfig(max_new_tokens=12, greedy=True, stop_on_eos=False)


def _span_of(swarm, peer_id: str) -> Span | None:
    records, _ = swarm.server_records()
    info = records.get(peer_id)
    return info.span if info is not None and info.state is ServerState.ONLINE else None


def test_deactivated_span_is_taken_over_by_an_honest_server(tmp_path, local_pipeline):
    with LocalSwarm(MODEL) as swarm:
        swarm.start_bootstrap()
        swarm.start_server("0:10", extra=["--no-rebalance"])
        swarm.start_server("10:20", extra=["--no-rebalance"])
        faulty = swarm.start_server("20:30", extra=["--no-rebalance", "--fault", "zeros"])
        swarm.wait_until_online(3)
        verifier = Verifier(VerifierNodeConfig(MODEL, tuple(swarm.initial_peers), decode_steps=2, jitter_s=0.0, seed=0,
                                               decisions=VerifierConfig(ledger_path=tmp_path / "ledger.sqlite")))
        try:
            verifier.start()
            spare = swarm.start_server(num_blocks=10, extra=[
                "--trusted-verifiers", verifier.key, "--announce-interval", "1", "--rebalance-interval", "2"])
            swarm.wait_until_online(4)
            spare_peer = peer_id_of(spare)
            assert _span_of(swarm, spare_peer) == Span(0, 10)  # all spans equally covered: the leftmost
            for _ in range(10):
                if peer_id_of(faulty) in verifier.run_round().inactive:
                    break
            else:
                pytest.fail("the zeros server was never deactivated")
            deadline = time.monotonic() + 90
            while _span_of(swarm, spare_peer) != Span(20, 30) and time.monotonic() < deadline:
                verifier.run_round()  # keeps the verdicts fresh
                time.sleep(1)
            assert _span_of(swarm, spare_peer) == Span(20, 30), spare.log()[-2000:]

            client = DistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers,
                                                                 RemoteClientConfig(trusted_verifier_keys=(verifier.key,)))
            try:
                input_ids = local_pipeline.encode_prompt("Name three colours of the rainbow.")
                assert client.generate(input_ids, GREEDY).token_ids == local_pipeline.generate(input_ids, GREEDY).token_ids
            finally:
                client.shutdown()
        finally:
            verifier.shutdown()
