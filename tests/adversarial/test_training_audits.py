"""Verified training (issue 19): servers that answer noisy, zero or stale-adapter gradients are proven liars by
a verifier recomputing their signed answers, the step is redone on an honest server (the losses are the local
ones), the liars are deactivated; honest servers are never flagged; edited evidence proves nothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from efedllm.client.config import RemoteClientConfig
from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.client.routing import RouteHop
from efedllm.client.training_audit import TrainingAuditor
from efedllm.common.errors import RecordError
from efedllm.common.spans import Span
from efedllm.models.adapters import AdapterSpec
from efedllm.protocol.messages import TrainRequest
from efedllm.server.swarm import LocalSwarm, peer_id_of
from efedllm.verifier.config import VerifierConfig
from efedllm.verifier.node import Verifier, VerifierNodeConfig

MODEL = "smollm2-135m"
SPEC = AdapterSpec("lora", rank=4, alpha=8.0)
CHEATS = {"noisy": "grad-noise:0.05", "zeros": "grad-zeros", "stale": "grad-stale"}
TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank today.",
         "A lighthouse keeper counts the ships that pass in the night, one by one."]


@pytest.fixture(scope="module")
def training_audit_swarm(tmp_path_factory):
    with LocalSwarm(MODEL) as swarm:
        swarm.start_bootstrap()
        servers = {"first": swarm.start_server("0:10", extra=["--no-rebalance"]),
                   "honest": swarm.start_server("10:20", extra=["--no-rebalance"]),
                   "last": swarm.start_server("20:30", extra=["--no-rebalance"])}
        for name, fault in CHEATS.items():
            servers[name] = swarm.start_server("10:20", extra=["--no-rebalance", "--fault", fault])
        swarm.wait_until_online(len(servers))
        peers = {name: peer_id_of(server) for name, server in servers.items()}
        decisions = VerifierConfig(ledger_path=tmp_path_factory.mktemp("ledger") / "ledger.sqlite")
        verifier = Verifier(VerifierNodeConfig(MODEL, tuple(swarm.initial_peers), rounds=1, decisions=decisions))
        verifier.start()
        config = RemoteClientConfig(trusted_verifier_keys=(verifier.key,), train_audit_fraction=1.0,
                                    server_view_max_age=0.0)
        client = DistributedModelForCausalLM.from_pretrained(MODEL, swarm.initial_peers, config)
        try:
            yield verifier, client, peers
        finally:
            client.shutdown()
            verifier.shutdown()


@pytest.fixture(scope="module")
def batch(client_parts):
    return torch.tensor([client_parts.tokenizer(text)["input_ids"][:10] for text in TEXTS])  # [2, 10]


def route_through(peers: dict[str, str], middle: str) -> list[RouteHop]:
    return [RouteHop(peers["first"], Span(0, 10)), RouteHop(peers[middle], Span(10, 20)),
            RouteHop(peers["last"], Span(20, 30))]


def train(model, batch, steps: int) -> list[float]:
    """``steps`` AdamW steps; LoRA's B starts moved off zero so that every gradient is non-zero."""
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        for name, parameter in model.named_parameters():
            if name.endswith("lora_B"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cheat", list(CHEATS))
def test_a_backward_fault_is_proven_redone_on_an_honest_server_and_changes_no_loss(training_audit_swarm, local_pipeline,
                                                                                   batch, cheat):
    verifier, client, peers = training_audit_swarm
    remote = client.trainable(SPEC, seed=2, attempts=6, route=route_through(peers, cheat))
    remote_losses = train(remote, batch, steps=2)  # stale gradients differ from the second step on
    local_losses = train(local_pipeline.trainable(SPEC, seed=2), batch, steps=2)
    assert all(abs(left - right) <= 1e-4 * abs(right) for left, right in zip(remote_losses, local_losses)), \
        (remote_losses, local_losses)
    middle = remote.runners[1]
    assert peers[cheat] in middle.liars and peers[cheat] in verifier.proven_liars
    assert middle.peer_id == peers["honest"]  # where the step was redone and training went on
    assert peers["honest"] not in verifier.proven_liars
    assert not {peers["first"], peers["last"]} & set(verifier.proven_liars)
    assert "gradients are off" in verifier.proven_liars[peers[cheat]]


def test_honest_training_answers_are_all_audited_clean(training_audit_swarm, batch):
    verifier, client, peers = training_audit_swarm
    before = len(client.audits)
    remote = client.trainable(SPEC, seed=4, route=route_through(peers, "honest"))
    train(remote, batch, steps=2)
    verdicts = [record.verdict for record in client.audits[before:]]
    assert len(verdicts) == 12 and all(verdict.verdict == "clean" for verdict in verdicts), verdicts  # 3 hops x 2 x 2
    assert not any(runner.liars for runner in remote.runners)
    assert not {peers["first"], peers["honest"], peers["last"]} & set(verifier.proven_liars)


def test_edited_training_evidence_proves_nothing_and_a_tampered_answer_is_refused(training_audit_swarm):
    verifier, client, peers = training_audit_swarm
    hidden = torch.randn(1, 4, client.parts.config.hidden_size)
    request = TrainRequest(Span(10, 20), "ptune", (), prompts=1, receipts=True)
    exchange = client.run(client.stub(peers["honest"]).train_exchange(request, [hidden]))
    auditor = TrainingAuditor(MODEL, 1.0)
    evidence = auditor.evidence(exchange, peers["honest"], request)
    with pytest.raises(RecordError, match="receipt certificate of .*, expected"):
        auditor.evidence(exchange, peers["first"], request)  # another server's answer passed off as this one's
    edited = exchange.answer_tensors[0]
    edited = type(edited)(dtype=edited.dtype, size=list(edited.size), buffer=bytes(len(edited.buffer)),
                          compression=edited.compression, requires_grad=edited.requires_grad)
    forged = dataclasses.replace(exchange, answer_tensors=[edited])
    with pytest.raises(RecordError, match="other bytes"):
        auditor.evidence(forged, peers["honest"], request)
    verdict = client.audit_training(evidence, exchange.request_tensors + [edited])  # the client's own edit
    assert verdict.verdict == "invalid" and peers["honest"] not in verifier.proven_liars
    assert client.audit_training(evidence, exchange.request_tensors + exchange.answer_tensors).verdict == "clean"
