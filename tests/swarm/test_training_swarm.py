"""Fine-tuning through real servers on 127.0.0.1 (issue 19): gradients through three servers equal local
autograd for LoRA, prompt tuning and deep prompt tuning; training steps give the local losses; a server killed
mid-training loses no step and changes no loss; malformed training requests are refused by name."""

from __future__ import annotations

import pytest
import torch
from hivemind.proto import runtime_pb2

from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.client.sampling import GenerationConfig
from efedllm.common.spans import Span
from efedllm.models.adapters import AdapterSpec, adapter_shapes
from efedllm.protocol import codec
from efedllm.protocol.messages import Reply, TrainRequest
from efedllm.server.swarm import LocalSwarm, peer_id_of

MODEL = "smollm2-135m"
TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank today.",
         "A lighthouse keeper counts the ships that pass in the night, one by one."]
SPECS = {"lora": AdapterSpec("lora", rank=4, alpha=8.0), "ptune": AdapterSpec("ptune", prompts=4),
         "deep-ptune": AdapterSpec("deep-ptune", prompts=3)}


@pytest.fixture(scope="module")
def training_swarm():
    """Four servers: blocks 10:20 twice, so that one of them can be killed mid-training."""
    with LocalSwarm(MODEL) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:10", "10:20", "10:20", "20:30"):
            swarm.start_server(blocks, extra=["--no-rebalance"])
        swarm.wait_until_online(4)
        yield swarm


@pytest.fixture
def swarm_model(training_swarm):
    model = DistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=training_swarm.initial_peers)
    yield model
    model.shutdown()


@pytest.fixture(scope="module")
def batch(client_parts):
    return torch.tensor([client_parts.tokenizer(text)["input_ids"][:12] for text in TEXTS])  # [2, 12]


def perturbed(model):
    """LoRA's B starts at zero, which leaves A's gradients zero: move it so that a test sees both."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_B"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def relative_error(left: torch.Tensor, right: torch.Tensor) -> float:
    return float((left - right).norm() / right.norm().clamp_min(1e-12))


@pytest.mark.parametrize("method", list(SPECS))
def test_gradients_through_three_servers_equal_local_autograd(swarm_model, local_pipeline, batch, method):
    remote = perturbed(swarm_model.trainable(SPECS[method], seed=3))
    local = perturbed(local_pipeline.trainable(SPECS[method], seed=3))
    assert len(remote.runners) == 3 and [runner.span for runner in remote.runners] == [Span(0, 10), Span(10, 20), Span(20, 30)]
    losses = []
    for model in (remote, local):
        loss = model(batch, labels=batch).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-4 * abs(losses[1])
    local_grads = dict(local.named_parameters())
    for name, parameter in remote.named_parameters():
        assert relative_error(parameter.grad, local_grads[name].grad) <= 1e-4, name


def train(model, batch, steps: int, kill_after: int | None = None, kill=None) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(steps):
        if step == kill_after:
            kill()
        optimizer.zero_grad()
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_twenty_steps_give_the_local_losses_and_a_killed_server_changes_none(training_swarm, swarm_model, local_pipeline,
                                                                             batch):
    spec = AdapterSpec("lora", rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    expected = train(local_pipeline.trainable(spec, seed=5), batch, 20)
    remote = swarm_model.trainable(spec, seed=5)
    middle = remote.runners[1]
    first_peer = middle.peer_id

    def kill_middle_server() -> None:
        training_swarm.kill(next(server for server in training_swarm.servers if peer_id_of(server) == first_peer))

    losses = train(remote, batch, 20, kill_after=8, kill=kill_middle_server)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, expected)) <= 1e-3
    assert losses[-1] < 0.8 * losses[0]  # it learns
    assert middle.replays == 1 and middle.peer_id != first_peer and first_peer in swarm_model.view.banned
    assert middle.bytes_sent > 0 and middle.bytes_received > 0


def _train_call(model, peer_id: str, metadata, tensors=()) -> Reply:
    stub = model.stub(peer_id).stub
    request = runtime_pb2.ExpertRequest(tensors=list(tensors), metadata=codec.pack_metadata(metadata))
    return codec.read_message(Reply, model.run(stub.rpc_train(request)))


def test_malformed_training_requests_are_refused_by_name(swarm_model):
    runner = swarm_model.trainable(SPECS["lora"]).runners[2]
    peer, span = runner.peer_id, runner.span
    hidden = codec.encode_tensors([torch.randn(1, 4, 576)])
    name = f"blocks.{span.start}.self_attn.q_proj.lora_A"
    shapes = adapter_shapes(swarm_model.parts.config, span, AdapterSpec("lora", rank=4, alpha=8.0, targets=("q_proj",)))
    assert next(iter(shapes)) == name
    cases = {
        "expected 2 tensors, got 1": (TrainRequest(span, "lora", (name,), rank=4, alpha=8.0, targets=("q_proj",)), hidden),
        "not inside this server's span": (TrainRequest(Span(0, 10), "lora", (), rank=4, alpha=8.0, targets=("q_proj",)), hidden),
        "missing": (TrainRequest(span, "lora", (), rank=4, alpha=8.0, targets=("q_proj",)), hidden),
        "must be (4, 576)": (TrainRequest(span, "lora", tuple(shapes), rank=4, alpha=8.0, targets=("q_proj",)),
                             hidden + codec.encode_tensors([torch.zeros(3, 576), *[torch.zeros(shape) for shape in
                                                                                  list(shapes.values())[1:]]])),
        "hidden states must be": (TrainRequest(span, "ptune", (), prompts=1), codec.encode_tensors([torch.randn(1, 4, 7)])),
    }
    for expected, (request, tensors) in cases.items():
        reply = _train_call(swarm_model, peer, request.to_wire(), tensors)
        assert not reply.ok and expected in reply.error, (expected, reply.error)
    unknown_method = dict(TrainRequest(span, "ptune", (), prompts=1).to_wire(), method="full")
    reply = _train_call(swarm_model, peer, unknown_method, hidden)
    assert not reply.ok and "method must be lora, ptune or deep-ptune" in reply.error
    reply = _train_call(swarm_model, peer, {"kind": "train request", "span": [20, 30]}, hidden)
    assert not reply.ok and "lacks field(s)" in reply.error
    outputs = swarm_model.run(swarm_model.stub(peer).train(TrainRequest(span, "ptune", (), prompts=1),
                                                           [torch.randn(1, 4, 576)]))
    assert outputs[0].shape == (1, 4, 576)  # and it keeps serving


def test_generation_with_an_adapter_through_the_swarm_equals_local(swarm_model, local_pipeline, client_parts):
    config = GenerationConfig(max_new_tokens=5, greedy=True, stop_on_eos=False)
    ids = client_parts.tokenizer("The lighthouse keeper", return_tensors="pt")["input_ids"]
    results = {}
    for name, host in (("swarm", swarm_model), ("local", local_pipeline)):
        adapted = perturbed(host.trainable(SPECS["lora"], seed=3))
        results[name] = host.generate_adapted(adapted, ids, config)
        with torch.no_grad():
            results[name + " logits"] = adapted(ids).logits
    assert results["swarm"].token_ids == results["local"].token_ids and results["swarm"].new_tokens == 5
    assert torch.allclose(results["swarm logits"], results["local logits"], atol=1e-4)
    with torch.no_grad():
        base = local_pipeline.trainable(SPECS["lora"], seed=3)(ids).logits  # B = 0: the base model's logits
    assert (results["local logits"] - base).abs().max() > 1e-2  # the adapter is applied, not ignored


def test_prompt_tuned_generation_uses_cached_sessions_and_gives_the_uncached_tokens(swarm_model, local_pipeline,
                                                                                      client_parts):
    config = GenerationConfig(max_new_tokens=5, greedy=True, stop_on_eos=False)
    ids = client_parts.tokenizer("The lighthouse keeper", return_tensors="pt")["input_ids"]
    tokens = {}
    for name, host in (("swarm", swarm_model), ("local", local_pipeline)):
        adapted = host.trainable(SPECS["ptune"], seed=5)
        with torch.no_grad():
            adapted.prompts.mul_(20.0)  # prompts that change the text
        for cache in (True, False):
            tokens[name, cache] = host.generate_adapted(adapted, ids, config, cache=cache).token_ids
    assert tokens["swarm", True] == tokens["swarm", False] == tokens["local", True] == tokens["local", False]
    assert tokens["local", True] != local_pipeline.generate(ids, config).token_ids
