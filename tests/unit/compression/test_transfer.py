import msgpack
import pytest
import torch
from torch import nn

from efedllm.compression.lowrank import InterpolativeLinear, LowRankLinear
from efedllm.compression.transfer import TransferError, load_packed_layers, pack_layers, transfer_size, unpack_layers


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 48, bias=False)
        self.down = nn.Linear(48, 16, bias=True)

    def forward(self, hidden):
        return hidden + self.down(torch.relu(self.up(self.norm(hidden))))


def _span(compress: bool) -> nn.ModuleList:
    torch.manual_seed(0)
    layers = nn.ModuleList([TinyBlock(), TinyBlock()])
    if compress:
        layers[0].up = LowRankLinear.from_linear(layers[0].up, 6)
        layers[1].down = LowRankLinear.from_linear(layers[1].down, 5)
    return layers


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_gives_the_same_outputs(compress):
    sender = _span(compress)
    packed = unpack_layers(pack_layers(sender, start=7))
    assert packed.start == 7 and packed.end == 9
    torch.manual_seed(1)
    receiver = nn.ModuleList([TinyBlock(), TinyBlock()])  # different weights, dense
    load_packed_layers(receiver, packed)
    hidden = torch.randn(2, 3, 16)
    for send, receive in zip(sender, receiver):
        assert type(send.up) is type(receive.up) and type(send.down) is type(receive.down)
        assert torch.equal(send(hidden), receive(hidden))


def test_compressed_transfer_is_smaller_by_the_factor_sizes():
    dense = transfer_size(_span(False))
    compressed = transfer_size(_span(True))
    assert dense.payload_bytes == dense.dense_bytes
    assert compressed.dense_bytes == dense.dense_bytes
    saved = 4 * ((16 * 48 - 6 * (16 + 48 + 1)) + (48 * 16 - 5 * (48 + 16 + 1)))
    assert dense.payload_bytes - compressed.payload_bytes == pytest.approx(saved, abs=200)  # msgpack headers


def test_malformed_payloads_are_rejected():
    good = msgpack.unpackb(pack_layers(_span(True), 0), raw=False)
    with pytest.raises(TransferError, match="msgpack"):
        unpack_layers(b"\xc1garbage")
    with pytest.raises(TransferError, match="version"):
        unpack_layers(msgpack.packb({**good, "version": 99}))
    truncated = {**good, "layers": [dict(good["layers"][0]), *good["layers"][1:]]}
    record = dict(truncated["layers"][0]["up.U"])
    record["data"] = record["data"][:-4]
    truncated["layers"][0]["up.U"] = record
    with pytest.raises(TransferError, match="bytes"):
        unpack_layers(msgpack.packb(truncated, use_bin_type=True))
    nan = {**good, "layers": [dict(good["layers"][0]), *good["layers"][1:]]}
    nan["layers"][0]["norm.weight"] = {"dtype": "float32", "shape": [1], "data": torch.tensor([float("nan")]).numpy().tobytes()}
    with pytest.raises(TransferError, match="NaN"):
        unpack_layers(msgpack.packb(nan, use_bin_type=True))


def test_payload_for_another_architecture_is_rejected():
    packed = unpack_layers(pack_layers(_span(False), 0))
    with pytest.raises(TransferError, match="layers"):
        load_packed_layers(nn.ModuleList([TinyBlock()]), packed)
    other = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    with pytest.raises(TransferError, match="architecture"):
        load_packed_layers(other, packed)


def _interpolative_span() -> nn.ModuleList:
    layers = _span(False)
    for layer, rank in zip(layers, (6, 5)):
        factors = LowRankLinear.from_linear(layer.up, rank).factors
        layer.up = InterpolativeLinear.from_factors(factors, None, torch.float32)
    return layers


def test_interpolative_projections_round_trip_bit_identically():
    sender = _interpolative_span()
    torch.manual_seed(1)
    receiver = nn.ModuleList([TinyBlock(), TinyBlock()])
    load_packed_layers(receiver, unpack_layers(pack_layers(sender, 0)))
    hidden = torch.randn(2, 3, 16)
    for send, receive in zip(sender, receiver):
        assert isinstance(receive.up, InterpolativeLinear)
        assert torch.equal(send(hidden), receive(hidden))


@pytest.mark.parametrize("part, value, message", [
    ("order", list(range(47)) + [0], "permutation"),
    ("order", list(range(40)), "shapes"),
    ("mix", None, "lacks"),
])
def test_malformed_interpolative_parts_are_rejected(part, value, message):
    good = msgpack.unpackb(pack_layers(_interpolative_span(), 0), raw=False)
    layer = dict(good["layers"][0])
    if value is None:
        del layer[f"up.{part}"]
    else:
        layer[f"up.{part}"] = {"dtype": "int64", "shape": [len(value)], "data": torch.tensor(value).numpy().tobytes()}
    payload = msgpack.packb({**good, "layers": [layer, *good["layers"][1:]]}, use_bin_type=True)
    torch.manual_seed(1)
    with pytest.raises(TransferError, match=message):
        load_packed_layers(nn.ModuleList([TinyBlock(), TinyBlock()]), unpack_layers(payload))
