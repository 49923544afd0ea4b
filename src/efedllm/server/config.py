"""The server's frozen configuration; ``efedllm serve`` only builds it."""

from __future__ import annotations

from dataclasses import dataclass

from efedllm.records import Span
from efedllm.wire import WIRE_FORMATS


@dataclass(frozen=True)
class ServerConfig:
    """How one server runs.

    ``blocks`` fixes the span; otherwise ``num_blocks`` blocks are chosen where the swarm is
    thinnest (and re-chosen every ``rebalance_interval`` seconds when ``rebalance`` is on).
    ``weights_from`` names a peer (base58 id) to fetch the first span's weights from instead of
    reading them from the model file (moves read the file). ``wire_formats`` are the formats it accepts and sends; ``fault`` injects a fault mode
    (tests and benchmarks of the verifier only). Servers deactivated by ``verifier_quorum`` of
    the ``trusted_verifier_keys`` count as absent when choosing blocks (no keys: none are).
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
    compression: object | None = None  # a compression.apply.CompressionConfig
    weights_from: str | None = None  # peer id of a server whose span contains ours: fetch our weights from it
    torch_threads: int | None = 1  # None: torch's default (the cores); 1 keeps many local servers from oversubscribing
    trusted_verifier_keys: tuple[str, ...] = ()
    verifier_quorum: str = "majority"

    def __post_init__(self) -> None:
        from efedllm.verifier.quorum import QuorumRule

        object.__setattr__(self, "trusted_verifier_keys", tuple(self.trusted_verifier_keys))
        if not all(isinstance(key, str) and key for key in self.trusted_verifier_keys):
            raise ValueError("trusted_verifier_keys must be non-empty hex strings")
        if self.trusted_verifier_keys:
            QuorumRule.parse(self.verifier_quorum).required_votes(len(self.trusted_verifier_keys))
        if (self.blocks is None) == (self.num_blocks is None):
            raise ValueError("give exactly one of blocks (e.g. 0:10) or num_blocks")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_sessions < 1 or self.max_session_length < 1:
            raise ValueError("max_sessions and max_session_length must be >= 1")
        unknown = set(self.wire_formats) - set(WIRE_FORMATS)
        if unknown:
            raise ValueError(f"unknown wire format(s) {sorted(unknown)}; choose from {list(WIRE_FORMATS)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {self.dtype!r} must be float32, bfloat16 or float16")
        if self.weights_from is not None:
            from hivemind.p2p import PeerID

            try:
                PeerID.from_base58(self.weights_from)
            except Exception:
                raise ValueError(f"weights_from must be a peer id (base58), got {self.weights_from!r}") from None
        if self.announce_interval <= 0 or self.rebalance_interval <= 0 or (self.torch_threads is not None and self.torch_threads < 1):
            raise ValueError("intervals must be > 0 and torch_threads >= 1")

    @property
    def host_maddrs(self) -> list[str]:
        return [f"/ip4/{self.host}/tcp/{self.port}"]
