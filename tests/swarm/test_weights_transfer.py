"""``--weights-from``: a joining server takes its span's weights from a peer, dense or as SVD factors."""

from __future__ import annotations

import re

import pytest
import torch

from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.common.spans import Span
from efedllm.protocol import codec
from efedllm.protocol.messages import OpenSessionRequest, StepRequest
from efedllm.server.swarm import LocalSwarm, peer_id_of

pytestmark = pytest.mark.swarm
COMPRESSION = ["--svd-ratio", "0.6", "--svd-method", "plain"]
RECEIVED = re.compile(r"received blocks (\S+) from (\S+): (\d+) bytes on the wire, (\d+) dense")


@pytest.fixture(scope="module")
def senders():
    """A dense server on 0:10, a compressed one (plain SVD, C = 0.6) on 10:20, and 20:30 so that clients find a chain."""
    with LocalSwarm("smollm2-135m") as swarm:
        swarm.start_bootstrap()
        dense = swarm.start_server("0:10", extra=["--no-rebalance"])
        compressed = swarm.start_server("10:20", extra=["--no-rebalance", *COMPRESSION])
        swarm.start_server("20:30", extra=["--no-rebalance"])
        swarm.wait_until_online(3)
        yield swarm, peer_id_of(dense), peer_id_of(compressed)


def _client(swarm):
    return DistributedModelForCausalLM.from_pretrained("smollm2-135m", swarm.initial_peers)


def _span_output(client, peer_id: str, span: Span, hidden: torch.Tensor) -> torch.Tensor:
    """One prefill step of ``hidden`` through ``span`` on ``peer_id``, over the real RPCs."""
    stub = client.stub(peer_id)
    session_id = f"transfer-check-{peer_id[-8:]}"
    client.run(stub.open_session(OpenSessionRequest(session_id, span, 16)))
    answer = client.run(stub.step(StepRequest(session_id, span, 0), codec.encode_hidden(hidden, "float32")))
    return codec.decode_hidden(answer, "float32", torch.float32)


def _received(server) -> tuple[int, int]:
    match = RECEIVED.search(server.log())
    assert match, server.log()[-2000:]
    return int(match.group(3)), int(match.group(4))


def test_receivers_compute_what_their_senders_compute(senders):
    swarm, dense_peer, compressed_peer = senders
    dense_copy = swarm.start_server("0:10", extra=["--no-rebalance", "--weights-from", dense_peer])
    compressed_copy = swarm.start_server("10:20", extra=["--no-rebalance", *COMPRESSION, "--weights-from", compressed_peer])
    swarm.wait_until_online(5)

    dense_bytes, dense_equivalent = _received(dense_copy)
    assert dense_bytes == dense_equivalent
    sent, dense = _received(compressed_copy)
    assert 0.55 < sent / dense < 0.65  # eq. 9 factors of a C = 0.6 span: about C x the dense bytes

    hidden = torch.randn(1, 5, 576, generator=torch.Generator().manual_seed(0))
    client = _client(swarm)
    try:
        for sender, receiver, span in ((dense_peer, dense_copy, Span(0, 10)), (compressed_peer, compressed_copy, Span(10, 20))):
            expected = _span_output(client, sender, span, hidden)
            assert torch.equal(_span_output(client, peer_id_of(receiver), span, hidden), expected)
    finally:
        client.shutdown()


@pytest.mark.parametrize(
    ("blocks", "extra", "message"),
    [
        ("20:30", [], "not inside this server's span"),
        ("10:20", [], "compressed with"),  # a dense server cannot serve a compressed peer's weights
    ],
)
def test_refused_transfers_say_why(senders, blocks, extra, message):
    swarm, dense_peer, compressed_peer = senders
    source = dense_peer if blocks == "20:30" else compressed_peer
    receiver = swarm.start_server(blocks, extra=["--no-rebalance", "--weights-from", source, *extra])
    assert receiver.process.wait(timeout=180) != 0
    assert message in receiver.log()
    swarm.servers.remove(receiver)  # it exited by design; keep the fixture's health checks meaningful
