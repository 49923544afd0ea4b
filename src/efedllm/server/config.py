"""The server's frozen configuration; ``efedllm serve`` only builds it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hivemind.utils.multiaddr import Multiaddr

from efedllm.common.dtypes import parse_dtype
from efedllm.common.peers import parse_peer_id
from efedllm.common.spans import Span
from efedllm.compression.apply import CompressionConfig
from efedllm.models.quantization import parse_quantization, weight_format
from efedllm.dht.quorum import check_trusted_verifiers
from efedllm.protocol.codec import WIRE_FORMATS
from efedllm.server.admission import AdmissionPolicy
from efedllm.server.batching import BatchLimits
from efedllm.server.faults import parse_fault


@dataclass(frozen=True)
class ServerConfig:
    """How one server runs.

    ``blocks`` fixes the span; otherwise ``num_blocks`` blocks are chosen where the swarm is
    thinnest (and re-chosen every ``rebalance_interval`` seconds when ``rebalance`` is on).
    ``weights_from`` names a peer (base58 id) to fetch the first span's weights from instead of
    reading them from the model file (moves read the file). ``wire_formats`` are the formats it
    accepts and sends; ``fault`` injects a fault mode (tests and benchmarks of the verifier only),
    its random draws seeded with ``fault_seed``. ``quant="int8"`` keeps the span's projection weights
    in int8 (:mod:`efedllm.models.quantization`); the server then announces ``<dtype>+int8``.
    Servers deactivated by ``verifier_quorum`` of the ``trusted_verifier_keys`` count as absent when
    choosing blocks (no keys: none are). ``torch_threads`` is the compute threads (None: torch's
    default, every core). ``ready_file``: once the server is online, it writes there a JSON object
    with its peer id, span and addresses (and rewrites it when it moves), so a launcher waits on
    that file instead of reading its log. ``announce_maddrs``: the addresses other peers dial instead of the
    listening ones (a server behind NAT, port forwarding or a relay; each with an explicit port). ``cache_budget_mb``, ``max_batch`` and
    ``max_sessions_per_peer`` bound what sessions may hold (:meth:`admission_policy`); ``batch_limits`` how
    the steps of concurrent sessions merge into passes (:mod:`efedllm.server.batching`). ``metrics_port``: serve Prometheus metrics on ``host`` at this port (0: any free
    port, written to the ready file; None: no metrics). ``identity_path``: the server's key file (its peer id
    and signing key, created on first start); None: a fresh identity each start.
    """

    model: str = "smollm2-135m"
    blocks: Span | None = None
    num_blocks: int | None = None
    initial_peers: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    announce_maddrs: tuple[str, ...] = ()
    dtype: str = "float32"
    quant: str | None = None
    max_sessions: int = 16
    max_session_length: int = 2048
    wire_formats: tuple[str, ...] = WIRE_FORMATS
    announce_interval: float = 5.0
    rebalance: bool = True
    rebalance_interval: float = 10.0
    session_idle_timeout: float = 300.0
    fault: str | None = None
    fault_seed: int = 0
    compression: CompressionConfig | None = None
    weights_from: str | None = None  # peer id of a server whose span contains ours: fetch our weights from it
    torch_threads: int | None = None
    trusted_verifier_keys: tuple[str, ...] = ()
    verifier_quorum: str = "majority"
    ready_file: Path | None = None
    identity_path: Path | None = None
    cache_budget_mb: float | None = None
    max_batch: int = 16
    max_sessions_per_peer: int | None = None
    batch_limits: BatchLimits = BatchLimits()
    metrics_port: int | None = None

    def admission_policy(self, kv_bytes_per_token: int) -> AdmissionPolicy:
        """The limits on sessions for a span whose cache takes ``kv_bytes_per_token`` bytes per token.

        Default budget: ``max_sessions`` sessions of ``max_session_length`` tokens at batch 1; default
        per-peer limit: half the sessions (and half the budget)."""
        budget = (int(self.cache_budget_mb * 2**20) if self.cache_budget_mb is not None
                  else self.max_sessions * self.max_session_length * kv_bytes_per_token)
        per_peer = self.max_sessions_per_peer or max(1, self.max_sessions // 2)
        return AdmissionPolicy(budget, self.max_sessions, per_peer, self.max_batch, self.max_session_length)

    def __post_init__(self) -> None:
        object.__setattr__(self, "trusted_verifier_keys", check_trusted_verifiers(self.trusted_verifier_keys,
                                                                                  self.verifier_quorum))
        object.__setattr__(self, "initial_peers", tuple(self.initial_peers))
        object.__setattr__(self, "announce_maddrs", tuple(check_announce_maddr(maddr) for maddr in self.announce_maddrs))
        if (self.blocks is None) == (self.num_blocks is None):
            raise ValueError("give exactly one of blocks (e.g. 0:10) or num_blocks")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0 <= self.port <= 65535 or not 0 <= (self.metrics_port or 0) <= 65535:
            raise ValueError(f"port and metrics_port must be in 0..65535, got {self.port} and {self.metrics_port}")
        if self.max_sessions < 1 or self.max_session_length < 1 or self.max_batch < 1:
            raise ValueError("max_sessions, max_session_length and max_batch must be >= 1")
        if (self.cache_budget_mb is not None and not self.cache_budget_mb > 0) or (self.max_sessions_per_peer or 1) < 1:
            raise ValueError("cache_budget_mb must be > 0 and max_sessions_per_peer >= 1")
        unknown = set(self.wire_formats) - set(WIRE_FORMATS)
        if unknown or not self.wire_formats:
            raise ValueError(f"unknown or no wire format(s) {sorted(unknown)}; choose from {list(WIRE_FORMATS)}")
        parse_dtype(self.dtype)
        parse_quantization(self.quant)
        if self.quant is not None and self.compression is not None:
            raise ValueError("--quant and SVD compression (--svd-ratio / --svd-energy) cannot be combined yet: choose one")
        if self.fault is not None:
            parse_fault(self.fault)  # a bad --fault is reported before anything loads
        if self.weights_from is not None:
            parse_peer_id(self.weights_from)
        if self.announce_interval <= 0 or self.rebalance_interval <= 0 or (self.torch_threads is not None and self.torch_threads < 1):
            raise ValueError("intervals must be > 0 and torch_threads >= 1")

    @property
    def weight_format(self) -> str:
        """What the server announces and certifies: its dtype, plus ``+int8`` for int8 weights."""
        return weight_format(self.dtype, self.quant)

    @property
    def host_maddrs(self) -> list[str]:
        return [f"/ip4/{self.host}/tcp/{self.port}"]


def check_announce_maddr(text: str) -> str:
    """A multiaddr a server may announce: an IP or DNS name, then TCP with an explicit port (what p2pd dials)."""
    try:
        maddr = Multiaddr(text)
    except Exception as error:
        raise ValueError(f"announce address {text!r} is not a multiaddr: {error}") from None
    protocols = [protocol.name for protocol in maddr.protocols()]
    if len(protocols) != 2 or protocols[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or protocols[1] != "tcp":
        raise ValueError(f"announce address {text!r} must be /ip4|ip6|dns/HOST/tcp/PORT, e.g. /ip4/203.0.113.5/tcp/31337")
    if not 1 <= int(maddr.value_for_protocol("tcp")) <= 65535:
        raise ValueError(f"announce address {text!r} needs an explicit port in 1..65535")
    return str(maddr)
