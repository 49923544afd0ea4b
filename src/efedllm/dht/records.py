"""The records peers store in the DHT: server announcements, trust verdicts, spot-check evidence.

Each is a :class:`~efedllm.common.records.WireRecord` (strict, versioned by ``RECORD_VERSION``) and
is stored signed by its author's key (:mod:`efedllm.dht.signed`); who may store which record, and
how a reader checks that, is in :mod:`efedllm.dht.servers`, :mod:`efedllm.dht.verdicts` and
:mod:`efedllm.dht.evidence`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated

from efedllm.common.records import Count, Items, Key, NonNegative, Number, PeerId, Positive, Text, WireRecord, require
from efedllm.common.spans import Span

RECORD_VERSION = 3  # 3: records are bound to the identity key of their peer and dated (issue 15); 2: WIRE_VERSION 3
MAX_SUSPECTS = 64
Name = Annotated[str, Text(256)]
Short = Annotated[str, Text(32)]


class ServerState(str, enum.Enum):
    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True)
class ServerInfo(WireRecord, kind="server record", version=RECORD_VERSION):
    """What a server announces in the DHT under each of its blocks' keys.

    ``throughput`` is measured tokens per second through the whole span for one decode step;
    ``free_cache_tokens`` is how many more tokens of KV cache it can hold; ``public_key`` is the
    owner key its DHT records are signed with, whose libp2p peer id must be ``peer_id``
    (:mod:`efedllm.dht.identity`); ``issued_at`` (DHT time) orders a peer's records: a reader keeps
    the newest and rejects one dated beyond the clock skew. ``throughput`` is the server's own
    claim: clients use it only as a capped prior (:mod:`efedllm.client.routing`). ``dtype`` is the
    weight format the server computes in: a dtype, or ``<dtype>+int8`` for int8 weights.
    """

    peer_id: PeerId
    model: Name
    span: Span
    state: ServerState
    throughput: NonNegative
    free_cache_tokens: Count
    max_sessions: Positive
    public_key: Key
    software_version: Annotated[str, Text(64)]
    issued_at: NonNegative = 0.0
    wire_formats: tuple[Short, ...] = ("float32",)
    dtype: Short = "float32"


@dataclass(frozen=True)
class TrustVerdict(WireRecord, kind="trust verdict", version=RECORD_VERSION):
    """A verifier's signed judgement of one server, published in the DHT.

    ``score`` is paper eq. (3); ``active`` is the verifier's policy decision (eq. (4) under
    policy ``paper``; a confidence bound under policy ``robust``).
    """

    server_peer_id: PeerId
    score: NonNegative
    active: bool
    probes: Count
    passed: Count
    timestamp: NonNegative
    verifier_key: Key
    policy: Short

    def check(self) -> None:
        require(self.passed <= self.probes, "trust verdict.passed exceeds trust verdict.probes")


@dataclass(frozen=True)
class SpotCheckEvidence(WireRecord, kind="spot-check evidence", version=RECORD_VERSION):
    """A client's report that two chains gave different outputs for the same inputs (``verify_fraction``).

    ``suspects`` are the servers of both chains (at least one of them is wrong); stored in the DHT
    signed by the reporting client, whose key is ``reporter_key``. Verifiers probe suspects first.
    The worst metrics may be infinite (an output that was not finite at all).
    """

    suspects: Annotated[tuple[PeerId, ...], Items(1, MAX_SUSPECTS, "suspects")]
    tokens: Positive
    worst_cosine: Annotated[float, Number(finite=False)]
    worst_relative_l2: Annotated[float, Number(finite=False)]
    timestamp: NonNegative
    reporter_key: Key
