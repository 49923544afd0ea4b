"""Client spot checks on a real swarm: two disjoint chains agree when honest; a faulty one yields signed evidence.

Four servers start together: a whole-model one, a head 0:15 and two tails 15:30, one honest and
one adding noise. Each client bans one of the tails, so its two disjoint chains are the whole
server and head + the other tail. The cheapest chain can be "whole server for blocks 0:15, then a
tail", which leaves no disjoint second chain: a client with spot checks on must not choose it.
"""

from __future__ import annotations

import logging

import pytest

from efedllm.client.config import RemoteClientConfig
from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.client.sampling import GenerationConfig
from efedllm.dht.evidence import fetch_evidence
from efedllm.server.swarm import LocalSwarm, peer_id_of

pytestmark = pytest.mark.swarm
GREEDY = GenerationConfig(max_new_tokens=6, greedy=True, stop_on_eos=False)
PROMPT = "Name three colours of the rainbow."


def _generate(swarm, seed: int, banned: str):
    model = DistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", swarm.initial_peers, RemoteClientConfig(verify_fraction=1.0, spot_check_seed=seed))
    model.view.ban(banned)
    try:
        result = model.generate(model.encode_prompt(PROMPT), GREEDY)
        return model, result
    finally:
        model.shutdown()


def _seen(model) -> dict:
    return model.view.describe()


def test_spot_checks_pass_on_honest_chains_and_report_a_faulty_one(local_pipeline, caplog):
    caplog.set_level(logging.INFO, logger="efedllm.client")  # a failure shows why checks were skipped
    with LocalSwarm("smollm2-135m") as swarm:
        swarm.start_bootstrap()
        whole = swarm.start_server("0:30", extra=["--no-rebalance"])
        swarm.start_server("0:15", extra=["--no-rebalance"])
        honest_tail = swarm.start_server("15:30", extra=["--no-rebalance"])
        faulty = swarm.start_server("15:30", extra=["--no-rebalance", "--fault", "noise:0.05"])
        swarm.wait_until_online(4)

        model, result = _generate(swarm, seed=0, banned=peer_id_of(faulty))
        checker = model.spot_checker
        assert checker.checks == GREEDY.max_new_tokens and not checker.evidence, _seen(model)
        assert result.token_ids == local_pipeline.generate(local_pipeline.encode_prompt(PROMPT), GREEDY).token_ids

        model, _ = _generate(swarm, seed=1, banned=peer_id_of(honest_tail))
        checker = model.spot_checker
        assert checker.checks >= 1 and checker.evidence, (checker.checks, checker.skipped, _seen(model))
        reported = checker.evidence[0]
        assert peer_id_of(faulty) in reported.suspects and peer_id_of(whole) in reported.suspects
        published = fetch_evidence(swarm.dht, "smollm2-135m")
        assert any(evidence.reporter_key == model.client_key and peer_id_of(faulty) in evidence.suspects
                   for evidence in published)
