"""The server's frozen configuration; ``efedllm serve`` only builds it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from efedllm.common.dtypes import parse_dtype
from efedllm.common.peers import parse_peer_id
from efedllm.common.spans import Span
from efedllm.compression.apply import CompressionConfig
from efedllm.dht.quorum import check_trusted_verifiers
from efedllm.protocol.codec import WIRE_FORMATS
from efedllm.server.faults import parse_fault


@dataclass(frozen=True)
class ServerConfig:
    """How one server runs.

    ``blocks`` fixes the span; otherwise ``num_blocks`` blocks are chosen where the swarm is
    thinnest (and re-chosen every ``rebalance_interval`` seconds when ``rebalance`` is on).
    ``weights_from`` names a peer (base58 id) to fetch the first span's weights from instead of
    reading them from the model file (moves read the file). ``wire_formats`` are the formats it
    accepts and sends; ``fault`` injects a fault mode (tests and benchmarks of the verifier only).
    Servers deactivated by ``verifier_quorum`` of the ``trusted_verifier_keys`` count as absent when
    choosing blocks (no keys: none are). ``torch_threads`` is the compute threads (None: torch's
    default, every core). ``ready_file``: once the server is online, it writes there a JSON object
    with its peer id, span and addresses (and rewrites it when it moves), so a launcher waits on
    that file instead of reading its log.
    """

    model: str = "smollm2-135m"
    blocks: Span | None = None
    num_blocks: int | None = None
    initial_peers: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    dtype: str = "float32"
    max_sessions: int = 16
    max_session_length: int = 2048
    wire_formats: tuple[str, ...] = WIRE_FORMATS
    announce_interval: float = 5.0
    rebalance: bool = True
    rebalance_interval: float = 10.0
    session_idle_timeout: float = 300.0
    fault: str | None = None
    compression: CompressionConfig | None = None
    weights_from: str | None = None  # peer id of a server whose span contains ours: fetch our weights from it
    torch_threads: int | None = None
    trusted_verifier_keys: tuple[str, ...] = ()
    verifier_quorum: str = "majority"
    ready_file: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "trusted_verifier_keys", check_trusted_verifiers(self.trusted_verifier_keys,
                                                                                  self.verifier_quorum))
        object.__setattr__(self, "initial_peers", tuple(self.initial_peers))
        if (self.blocks is None) == (self.num_blocks is None):
            raise ValueError("give exactly one of blocks (e.g. 0:10) or num_blocks")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_sessions < 1 or self.max_session_length < 1:
            raise ValueError("max_sessions and max_session_length must be >= 1")
        unknown = set(self.wire_formats) - set(WIRE_FORMATS)
        if unknown or not self.wire_formats:
            raise ValueError(f"unknown or no wire format(s) {sorted(unknown)}; choose from {list(WIRE_FORMATS)}")
        parse_dtype(self.dtype)
        if self.fault is not None:
            parse_fault(self.fault)  # a bad --fault is reported before anything loads
        if self.weights_from is not None:
            parse_peer_id(self.weights_from)
        if self.announce_interval <= 0 or self.rebalance_interval <= 0 or (self.torch_threads is not None and self.torch_threads < 1):
            raise ValueError("intervals must be > 0 and torch_threads >= 1")

    @property
    def host_maddrs(self) -> list[str]:
        return [f"/ip4/{self.host}/tcp/{self.port}"]
