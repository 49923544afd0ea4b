"""The shared base: spans, the strict record codec, the error hierarchy, dtypes, the background loop."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Annotated

import pytest
import torch

from efedllm.client.routing import MissingBlocksError
from efedllm.common.background import BackgroundLoop
from efedllm.common.dtypes import DTYPE_NAMES, dtype_name, parse_dtype
from efedllm.common.errors import EfedllmError, RecordError
from efedllm.common.records import Number, Text, WireRecord, require
from efedllm.common.spans import Span, parse_spans
from efedllm.compression.transfer import TransferError
from efedllm.models.sessions import SpanInputError
from efedllm.models.sources import ModelNotFoundError
from efedllm.protocol.channel import ChannelError
from efedllm.protocol.service import HopFailure
from efedllm.server.weights import WeightsTransferError
from efedllm.verifier.ledger import LedgerError


def test_span_parsing_and_errors():
    assert parse_spans("0:10,10:30") == [Span(0, 10), Span(10, 30)]
    for bad in ("0-10", "5:5", "a:b", "0:10,11:20", ""):
        with pytest.raises(RecordError):
            parse_spans(bad)
    assert Span.from_wire(Span(3, 7).to_wire()) == Span(3, 7) and Span(3, 7).to_wire() == [3, 7]
    for bad in ([1], [1, 2, 3], "1:2", [True, 2], [-1, 2]):
        with pytest.raises(RecordError):
            Span.from_wire(bad)


class Colour(str, enum.Enum):
    RED = "red"


@dataclass(frozen=True)
class Part(WireRecord, kind="part"):
    name: Annotated[str, Text(8)]


@dataclass(frozen=True)
class Whole(WireRecord, kind="whole", version=4):
    count: Annotated[int, Number(minimum=0)]
    colour: Colour
    parts: tuple[Part, ...] = ()
    span: Span | None = None

    def check(self) -> None:
        require(self.count >= len(self.parts), "whole.count is below its parts")


def test_the_codec_follows_the_field_types_and_names_what_is_wrong():
    whole = Whole(2, Colour.RED, (Part("a"), Part("b")), Span(0, 3))
    wire = whole.to_wire()
    assert wire == {"version": 4, "count": 2, "colour": "red", "parts": [{"name": "a"}, {"name": "b"}], "span": [0, 3]}
    assert Whole.from_wire(wire) == whole
    assert Whole.from_wire({**wire, "span": None}).span is None
    with pytest.raises(RecordError, match="whole.parts\\[\\] must be of type part"):
        Whole(2, Colour.RED, ("a",))  # built in code: checked as if it had been read
    cases = [({**wire, "version": 3}, "whole has version 3, this peer reads version 4"),
             ({**wire, "colour": "blue"}, "whole.colour 'blue' is not one of"),
             ({**wire, "parts": "ab"}, "whole.parts must be a list"),
             ({**wire, "parts": [{"name": "x" * 9}]}, "part.name is longer than 8"),
             ({**wire, "count": -1}, "whole.count must be >= 0"),
             ({**wire, "count": True}, "whole.count must be of type int, got True"),
             ({**wire, "count": 1}, "whole.count is below its parts"),
             ({**wire, "span": [0]}, r"span must be \[start, end\]"),
             ({**wire, "more": 1}, "unknown field"),
             ({k: v for k, v in wire.items() if k != "count"}, r"lacks field\(s\) \['count'\]"),
             ([1, 2], "whole must be a mapping")]
    for data, message in cases:
        with pytest.raises(RecordError, match=message):
            Whole.from_wire(data)


def test_every_error_is_an_efedllm_error_and_keeps_its_builtin_base():
    for error, builtin in [(RecordError, ValueError), (ChannelError, ConnectionError), (HopFailure, RuntimeError),
                           (MissingBlocksError, RuntimeError), (SpanInputError, ValueError),
                           (ModelNotFoundError, FileNotFoundError), (TransferError, ValueError),
                           (WeightsTransferError, TransferError), (LedgerError, RuntimeError)]:
        assert issubclass(error, EfedllmError) and issubclass(error, builtin), error


def test_one_table_of_dtypes():
    assert DTYPE_NAMES == ("float32", "bfloat16", "float16")
    for name in DTYPE_NAMES:
        assert dtype_name(parse_dtype(name)) == name and parse_dtype(parse_dtype(name)) is parse_dtype(name)
    for bad in ("int8", torch.float64):
        with pytest.raises(ValueError, match="not supported"):
            parse_dtype(bad)
    with pytest.raises(ValueError, match="not supported"):
        dtype_name(torch.int32)


def test_background_loop_runs_coroutines_and_cancels_leftovers_at_shutdown():
    loop = BackgroundLoop("test-loop")
    with pytest.raises(RuntimeError, match="not running"):
        loop.run(asyncio.sleep(0))
    loop.start()
    assert loop.running

    async def add(a, b):
        await asyncio.sleep(0.01)
        return a + b

    assert loop.run(add(2, 3)) == 5
    forever = loop.submit(asyncio.sleep(3600))
    loop.shutdown()
    assert forever.cancelled() and not loop.running
    loop.shutdown()  # a second shutdown is a no-op
