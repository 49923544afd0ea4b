"""Bundles of one-way messages (one frame carrying several) and their strict parsing."""
import pytest
import torch
from hivemind.proto import runtime_pb2

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

from efedllm.protocol import codec
from efedllm.protocol.channel import BUNDLE_UID, MAX_BUNDLE_MESSAGES, FrameError, bundle, unbundle


def message(n: int, tensors: int) -> runtime_pb2.ExpertRequest:
    request = runtime_pb2.ExpertRequest(uid=f"m{n}", metadata=codec.pack_metadata({"n": n}))
    request.tensors.extend(serialize_torch_tensor(torch.full((1, 2), float(n))) for _ in range(tensors))
    return request


def test_a_bundle_gives_back_each_message_with_its_own_tensors_in_order():
    messages = [message(0, 2), message(1, 0), message(2, 1)]
    parts = unbundle(bundle(messages))
    assert [part.uid for part in parts] == ["m0", "m1", "m2"]
    assert [codec.unpack_metadata(part.metadata)["n"] for part in parts] == [0, 1, 2]
    assert [len(part.tensors) for part in parts] == [2, 0, 1]
    assert deserialize_torch_tensor(parts[2].tensors[0]).tolist() == [[2.0, 2.0]]


def packed(index, tensors: int = 0) -> runtime_pb2.ExpertRequest:
    request = runtime_pb2.ExpertRequest(uid=BUNDLE_UID, metadata=codec.pack_metadata(index))
    request.tensors.extend(serialize_torch_tensor(torch.zeros(1)) for _ in range(tensors))
    return request


@pytest.mark.parametrize("index, tensors, complaint", [
    ({"v": 2, "parts": [["a", b"", 0]]}, 0, "version"),
    ({"v": 1, "parts": []}, 0, "entries"),
    ({"v": 1, "parts": [["a", b"", 0]] * (MAX_BUNDLE_MESSAGES + 1)}, 0, "entries"),
    ({"v": 1, "parts": [["a", "not bytes", 0]]}, 0, "entries"),
    ({"v": 1, "parts": [["a", b"", -1]]}, 0, "entries"),
    ({"v": 1, "parts": [[BUNDLE_UID, b"", 0]]}, 0, "entries"),  # no bundle inside a bundle
    ({"v": 1, "parts": [["a", b"", 1]]}, 2, "holds 2"),
    ({"v": 1, "parts": [["a", b"", 2]]}, 1, "holds 1"),
    ({"v": 1}, 0, "entries"),
])
def test_a_malformed_bundle_is_refused_without_breaking_the_stream(index, tensors, complaint):
    with pytest.raises(FrameError, match=complaint) as caught:
        unbundle(packed(index, tensors))
    assert not caught.value.fatal


def test_a_bundle_whose_index_is_not_msgpack_is_refused():
    with pytest.raises(FrameError, match="bundle") as caught:
        unbundle(runtime_pb2.ExpertRequest(uid=BUNDLE_UID, metadata=b"\xc1\xc1"))
    assert not caught.value.fatal
