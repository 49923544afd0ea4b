"""Shared typed records that every role imports: spans, server records, trust verdicts, wire messages.

Everything that crosses a process boundary (the DHT, a P2P message) is one of these records,
serialised with ``to_wire()`` to plain msgpack-able values and parsed back with ``from_wire()``,
which validates strictly: a wrong version, a missing or extra field, or a value of the wrong
type or range raises :class:`RecordError` naming the field. Formats are versioned by
``RECORD_VERSION`` / ``WIRE_VERSION``; a peer that sees a newer version rejects it clearly rather
than misreading it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

RECORD_VERSION = 1
WIRE_VERSION = 2
MAX_SESSION_ID_LENGTH = 64
MAX_ROUTE_HOPS = 64


class RecordError(ValueError):
    """A record or message read from a peer or the DHT is malformed."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RecordError(message)


def _check_int(name: str, value: Any, minimum: int | None = None) -> int:
    _require(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an int, got {value!r}")
    if minimum is not None:
        _require(value >= minimum, f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float(name: str, value: Any, minimum: float | None = None, maximum: float | None = None) -> float:
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        f"{name} must be a finite number, got {value!r}",
    )
    if minimum is not None:
        _require(value >= minimum, f"{name} must be >= {minimum}, got {value}")
    if maximum is not None:
        _require(value <= maximum, f"{name} must be <= {maximum}, got {value}")
    return float(value)


def _check_str(name: str, value: Any, max_length: int = 256) -> str:
    _require(isinstance(value, str), f"{name} must be a string, got {type(value).__name__}")
    _require(len(value) <= max_length, f"{name} is longer than {max_length} characters")
    return value


def _check_keys(kind: str, data: Any, expected: set[str]) -> dict:
    _require(isinstance(data, dict), f"{kind} must be a mapping, got {type(data).__name__}")
    missing, extra = expected - data.keys(), data.keys() - expected
    _require(not missing, f"{kind} lacks field(s) {sorted(missing)}")
    _require(not extra, f"{kind} has unknown field(s) {sorted(map(str, extra))}")
    return data


def _check_version(kind: str, data: dict, key: str, supported: int) -> None:
    version = _check_int(f"{kind}.{key}", data[key], 1)
    _require(version == supported, f"{kind} has version {version}, this peer reads version {supported}")


@dataclass(frozen=True, order=True)
class Span:
    """A half-open range of transformer blocks ``[start, end)``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        _check_int("span.start", self.start, 0)
        _check_int("span.end", self.end, 1)
        _require(self.start < self.end, f"span start {self.start} must be below end {self.end}")

    @property
    def length(self) -> int:
        return self.end - self.start

    def contains(self, other: "Span") -> bool:
        return self.start <= other.start and other.end <= self.end

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    @classmethod
    def parse(cls, text: str) -> "Span":
        """Parse ``"START:END"`` (the CLI form)."""
        parts = text.split(":")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise RecordError(f"span {text!r} must look like START:END, e.g. 0:10")
        return cls(int(parts[0]), int(parts[1]))

    def to_wire(self) -> list[int]:
        return [self.start, self.end]

    @classmethod
    def from_wire(cls, data: Any) -> "Span":
        _require(isinstance(data, (list, tuple)) and len(data) == 2, f"span must be [start, end], got {data!r}")
        return cls(_check_int("span.start", data[0], 0), _check_int("span.end", data[1], 1))


def parse_spans(text: str) -> list[Span]:
    """Parse ``"0:10,10:20,20:30"`` into consecutive spans."""
    spans = [Span.parse(part) for part in text.split(",") if part.strip()]
    _require(bool(spans), "no spans given")
    for previous, following in zip(spans, spans[1:]):
        _require(previous.end == following.start, f"spans {previous} and {following} are not consecutive")
    return spans


class ServerState(str, enum.Enum):
    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True)
class ServerInfo:
    """What a server announces in the DHT under each of its blocks' keys.

    ``throughput`` is measured tokens per second through the whole span for one decode step;
    ``free_cache_tokens`` is how many more tokens of KV cache it can hold; ``public_key`` is the
    hex of the DER public key its DHT records are signed with.
    """

    peer_id: str
    model: str
    span: Span
    state: ServerState
    throughput: float
    free_cache_tokens: int
    max_sessions: int
    public_key: str
    software_version: str
    wire_formats: tuple[str, ...] = ("float32",)
    dtype: str = "float32"
    version: int = RECORD_VERSION

    def __post_init__(self) -> None:
        _check_str("server.peer_id", self.peer_id, 128)
        _check_str("server.model", self.model)
        _require(isinstance(self.span, Span), "server.span must be a Span")
        _require(isinstance(self.state, ServerState), f"server.state must be a ServerState, got {self.state!r}")
        _check_float("server.throughput", self.throughput, 0.0)
        _check_int("server.free_cache_tokens", self.free_cache_tokens, 0)
        _check_int("server.max_sessions", self.max_sessions, 1)
        _check_str("server.public_key", self.public_key, 4096)
        _check_str("server.software_version", self.software_version, 64)
        _require(
            isinstance(self.wire_formats, tuple) and all(isinstance(item, str) for item in self.wire_formats),
            "server.wire_formats must be a tuple of strings",
        )
        _check_str("server.dtype", self.dtype, 32)

    def to_wire(self) -> dict:
        data = asdict(self)
        data.update(span=self.span.to_wire(), state=self.state.value, wire_formats=list(self.wire_formats))
        return data

    @classmethod
    def from_wire(cls, data: Any) -> "ServerInfo":
        data = _check_keys("server record", data, {item.name for item in fields(cls)})
        _check_version("server record", data, "version", RECORD_VERSION)
        try:
            state = ServerState(data["state"])
        except ValueError:
            raise RecordError(f"server record state {data['state']!r} is not one of {[s.value for s in ServerState]}")
        formats = data["wire_formats"]
        _require(isinstance(formats, (list, tuple)), "server record wire_formats must be a list")
        return cls(**{**data, "span": Span.from_wire(data["span"]), "state": state, "wire_formats": tuple(formats)})


@dataclass(frozen=True)
class TrustVerdict:
    """A verifier's signed judgement of one server, published in the DHT.

    ``score`` is paper eq. (3); ``active`` is the verifier's policy decision (eq. (4) under
    policy ``paper``; a confidence bound under policy ``robust``).
    """

    server_peer_id: str
    score: float
    active: bool
    probes: int
    passed: int
    timestamp: float
    verifier_key: str
    policy: str
    version: int = RECORD_VERSION

    def __post_init__(self) -> None:
        _check_str("verdict.server_peer_id", self.server_peer_id, 128)
        _check_float("verdict.score", self.score, 0.0)
        _require(isinstance(self.active, bool), "verdict.active must be a bool")
        _check_int("verdict.probes", self.probes, 0)
        _check_int("verdict.passed", self.passed, 0)
        _require(self.passed <= self.probes, "verdict.passed exceeds verdict.probes")
        _check_float("verdict.timestamp", self.timestamp, 0.0)
        _check_str("verdict.verifier_key", self.verifier_key, 4096)
        _check_str("verdict.policy", self.policy, 32)

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Any) -> "TrustVerdict":
        data = _check_keys("trust verdict", data, {item.name for item in fields(cls)})
        _check_version("trust verdict", data, "version", RECORD_VERSION)
        return cls(**data)


@dataclass(frozen=True)
class Hop:
    """One server of a chain: which peer runs which blocks under which of its sessions."""

    peer_id: str
    span: Span
    session_id: str

    def to_wire(self) -> list:
        return [self.peer_id, self.span.to_wire(), self.session_id]

    @classmethod
    def from_wire(cls, data: Any) -> "Hop":
        _require(isinstance(data, (list, tuple)) and len(data) == 3, f"hop must be [peer, span, session], got {data!r}")
        return cls(
            _check_str("hop.peer_id", data[0], 128),
            Span.from_wire(data[1]),
            _check_session_id(data[2]),
        )


def _check_session_id(value: Any) -> str:
    text = _check_str("session_id", value, MAX_SESSION_ID_LENGTH)
    _require(bool(text) and text.isprintable(), "session_id must be a non-empty printable string")
    return text


@dataclass(frozen=True)
class Delivery:
    """Where the last hop of a chain sends a step's output: the requesting peer and its step id.

    With a delivery, every hop computes and hands its output on, and the last hop calls the
    requester's ``rpc_deliver`` (:class:`efedllm.delivery.DeliveryServicer`): the answer does not
    travel back along the chain. A hop that cannot serve the step, or finds its next hop gone,
    reports the error there, naming the peer to blame (:mod:`efedllm.server.handler`).
    """

    peer_id: str
    step_id: str

    def __post_init__(self) -> None:
        _check_str("delivery.peer_id", self.peer_id, 128)
        _check_step_id("delivery.step_id", self.step_id)

    def to_wire(self) -> list:
        return [self.peer_id, self.step_id]

    @classmethod
    def from_wire(cls, data: Any) -> "Delivery":
        _require(isinstance(data, (list, tuple)) and len(data) == 2, f"delivery must be [peer, step id], got {data!r}")
        return cls(_check_str("delivery.peer_id", data[0], 128), _check_step_id("delivery.step_id", data[1]))


def _check_step_id(name: str, value: Any) -> str:
    text = _check_str(name, value, MAX_SESSION_ID_LENGTH)
    _require(bool(text) and text.isprintable(), f"{name} must be a non-empty printable string")
    return text


@dataclass(frozen=True)
class StepRequest:
    """Metadata of one inference step; the hidden states travel beside it as a tensor.

    ``position`` is how many tokens the session already holds when the step starts: a server
    whose cache is longer crops it back first (so a retried step is idempotent), one whose cache
    is shorter rejects the step as out of order. ``next_hops`` is the rest of the chain that the
    server forwards its output to; empty means answer the caller. ``deliver_to`` (optional) makes
    the last hop send the output straight to that peer instead of back along the chain.
    """

    session_id: str
    span: Span
    position: int
    wire_format: str = "float32"
    next_hops: tuple[Hop, ...] = ()
    deliver_to: Delivery | None = None
    version: int = WIRE_VERSION

    def __post_init__(self) -> None:
        _check_session_id(self.session_id)
        _check_int("position", self.position, 0)
        _check_str("wire_format", self.wire_format, 16)
        _require(len(self.next_hops) <= MAX_ROUTE_HOPS, f"route has more than {MAX_ROUTE_HOPS} hops")

    def to_wire(self) -> dict:
        return {
            "version": self.version,
            "session_id": self.session_id,
            "span": self.span.to_wire(),
            "position": self.position,
            "wire_format": self.wire_format,
            "next_hops": [hop.to_wire() for hop in self.next_hops],
            "deliver_to": None if self.deliver_to is None else self.deliver_to.to_wire(),
        }

    @classmethod
    def from_wire(cls, data: Any) -> "StepRequest":
        keys = {"version", "session_id", "span", "position", "wire_format", "next_hops", "deliver_to"}
        data = _check_keys("step request", data, keys)
        _check_version("step request", data, "version", WIRE_VERSION)
        hops = data["next_hops"]
        _require(isinstance(hops, (list, tuple)), "step request next_hops must be a list")
        _require(len(hops) <= MAX_ROUTE_HOPS, f"route has more than {MAX_ROUTE_HOPS} hops")
        return cls(
            session_id=_check_session_id(data["session_id"]),
            span=Span.from_wire(data["span"]),
            position=_check_int("position", data["position"], 0),
            wire_format=_check_str("wire_format", data["wire_format"], 16),
            next_hops=tuple(Hop.from_wire(hop) for hop in hops),
            deliver_to=None if data["deliver_to"] is None else Delivery.from_wire(data["deliver_to"]),
        )


@dataclass(frozen=True)
class DeliveredStep:
    """Metadata of an ``rpc_deliver`` call: the step's output (as tensors beside it), or why the chain failed.

    ``failed_peer`` names the hop that could not be reached or answered with an error.
    """

    step_id: str
    error: str | None = None
    failed_peer: str | None = None
    version: int = WIRE_VERSION

    def __post_init__(self) -> None:
        _check_step_id("delivered step step_id", self.step_id)
        if self.error is not None:
            _check_str("delivered step error", self.error, 4096)
        if self.failed_peer is not None:
            _check_str("delivered step failed_peer", self.failed_peer, 128)

    def to_wire(self) -> dict:
        return {"version": self.version, "step_id": self.step_id, "error": self.error, "failed_peer": self.failed_peer}

    @classmethod
    def from_wire(cls, data: Any) -> "DeliveredStep":
        data = _check_keys("delivered step", data, {"version", "step_id", "error", "failed_peer"})
        _check_version("delivered step", data, "version", WIRE_VERSION)
        return cls(_check_step_id("delivered step step_id", data["step_id"]), data["error"], data["failed_peer"])


@dataclass(frozen=True)
class OpenSessionRequest:
    session_id: str
    span: Span
    max_length: int
    version: int = WIRE_VERSION

    def __post_init__(self) -> None:
        _check_session_id(self.session_id)
        _check_int("max_length", self.max_length, 1)

    def to_wire(self) -> dict:
        return {"version": self.version, "session_id": self.session_id, "span": self.span.to_wire(), "max_length": self.max_length}

    @classmethod
    def from_wire(cls, data: Any) -> "OpenSessionRequest":
        data = _check_keys("open-session request", data, {"version", "session_id", "span", "max_length"})
        _check_version("open-session request", data, "version", WIRE_VERSION)
        return cls(_check_session_id(data["session_id"]), Span.from_wire(data["span"]), _check_int("max_length", data["max_length"], 1))


@dataclass(frozen=True)
class PeerFailure:
    """Where a chain broke: the error a server returns when a downstream hop failed."""

    peer_id: str
    message: str
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class WeightsRequest:
    """Ask a server for the packed weights of ``span`` (inside its own span): ``--weights-from``."""

    span: Span
    version: int = WIRE_VERSION

    def to_wire(self) -> dict:
        return {"version": self.version, "span": self.span.to_wire()}

    @classmethod
    def from_wire(cls, data: Any) -> "WeightsRequest":
        data = _check_keys("weights request", data, {"version", "span"})
        _check_version("weights request", data, "version", WIRE_VERSION)
        return cls(Span.from_wire(data["span"]))


@dataclass(frozen=True)
class WeightsHeader:
    """First message of a weights stream: payload size, its dense-equivalent size, and how it was compressed.

    ``compression`` is the sender's :meth:`CompressionConfig.signature` (None: dense weights).
    """

    span: Span
    dtype: str
    payload_bytes: int
    dense_bytes: int
    compression: dict | None
    version: int = WIRE_VERSION

    def __post_init__(self) -> None:
        _check_str("dtype", self.dtype, 16)
        _check_int("payload_bytes", self.payload_bytes, 1)
        _check_int("dense_bytes", self.dense_bytes, 1)
        _require(self.compression is None or isinstance(self.compression, dict), "compression must be a map or null")

    def to_wire(self) -> dict:
        return {"version": self.version, "span": self.span.to_wire(), "dtype": self.dtype, "payload_bytes": self.payload_bytes,
                "dense_bytes": self.dense_bytes, "compression": self.compression}

    @classmethod
    def from_wire(cls, data: Any) -> "WeightsHeader":
        data = _check_keys("weights header", data, {"version", "span", "dtype", "payload_bytes", "dense_bytes", "compression"})
        _check_version("weights header", data, "version", WIRE_VERSION)
        return cls(Span.from_wire(data["span"]), data["dtype"], data["payload_bytes"], data["dense_bytes"], data["compression"])


@dataclass(frozen=True)
class SpotCheckEvidence:
    """A client's report that two chains gave different outputs for the same inputs (``verify_fraction``).

    ``suspects`` are the servers of both chains (at least one of them is wrong); stored in the DHT
    signed by the reporting client, whose key is ``reporter_key``. Verifiers probe suspects first.
    """

    suspects: tuple[str, ...]
    tokens: int
    worst_cosine: float
    worst_relative_l2: float
    timestamp: float
    reporter_key: str
    version: int = RECORD_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "suspects", tuple(self.suspects))
        _require(0 < len(self.suspects) <= 64, "evidence needs 1..64 suspects")
        for suspect in self.suspects:
            _check_str("evidence.suspect", suspect, 128)
        _check_int("evidence.tokens", self.tokens, 1)
        _check_float("evidence.timestamp", self.timestamp, 0.0)
        _check_str("evidence.reporter_key", self.reporter_key, 4096)
        for name in ("worst_cosine", "worst_relative_l2"):  # inf/NaN become strings on some encoders: keep numbers
            _require(isinstance(getattr(self, name), (int, float)), f"evidence.{name} must be a number")

    def to_wire(self) -> dict:
        data = asdict(self)
        data["suspects"] = list(self.suspects)
        return data

    @classmethod
    def from_wire(cls, data: Any) -> "SpotCheckEvidence":
        data = _check_keys("spot-check evidence", data, {item.name for item in fields(cls)})
        _check_version("spot-check evidence", data, "version", RECORD_VERSION)
        _require(isinstance(data["suspects"], (list, tuple)), "evidence.suspects must be a list")
        return cls(**{**data, "suspects": tuple(data["suspects"])})
