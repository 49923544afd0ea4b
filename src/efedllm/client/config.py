"""The distributed client's frozen configuration; ``efedllm generate`` only builds it."""

from __future__ import annotations

from dataclasses import dataclass

from efedllm.common.dtypes import parse_dtype
from efedllm.dht.quorum import check_trusted_verifiers
from efedllm.protocol.codec import check_wire_format


@dataclass(frozen=True)
class RemoteClientConfig:
    """How a :class:`~efedllm.client.remote.DistributedModelForCausalLM` talks to a swarm.

    ``relay`` routes every hop through the client; ``direct_delivery`` (chained steps only) makes
    the last hop send the output straight to the client, not back along the chain;
    ``wire_format`` defaults to the model dtype;
    ``max_retries`` bounds failover attempts per step, backing off from ``retry_delay`` up to ``max_retry_delay``;
    ``trusted_verifier_keys`` are the verifiers (hex keys) whose signed verdicts deactivate servers when
    ``verifier_quorum`` of them agree (no keys: no server is ever deactivated). ``verify_fraction``: the
    share of steps also run through a disjoint second chain and compared (:mod:`efedllm.client.spot_check`).
    ``server_view_max_age``: a new session reuses the server records read from the DHT this many
    seconds ago or less (reading them costs 50-75 ms here, 1.4% of a 64-token generation); a failover
    always reads them anew. ``refresh_view_in_background``: re-read them every 0.8 x
    ``server_view_max_age`` s in the background (as Petals' client does every 60 s), so a new session
    seldom waits for the DHT.

    ``audit_fraction``: with trusted verifiers, every step carries signed receipts and this share of
    sessions, drawn privately (``audit_seed``), is sent whole to a trusted verifier when it ends
    (:mod:`efedllm.client.audit`); 0 turns receipts and audits off. ``train_audit_fraction``: with trusted
    verifiers, every training request asks for a signed receipt and this share of them, drawn privately after
    the answer came, is recomputed by a verifier before the client uses it (:mod:`efedllm.client.training_audit`).
    """

    relay: bool = False
    direct_delivery: bool = True
    wire_format: str | None = None
    dtype: str = "float32"
    request_timeout: float = 30.0
    max_retries: int = 5
    retry_delay: float = 0.2
    max_retry_delay: float = 2.0
    discovery_timeout: float = 30.0
    trusted_verifier_keys: tuple[str, ...] = ()
    verifier_quorum: str = "majority"
    verify_fraction: float = 0.0
    spot_check_seed: int | None = None
    server_view_max_age: float = 10.0
    refresh_view_in_background: bool = True
    audit_fraction: float = 0.5
    audit_seed: int | None = None
    train_audit_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.wire_format is not None:
            check_wire_format(self.wire_format)
        parse_dtype(self.dtype)
        object.__setattr__(self, "trusted_verifier_keys", check_trusted_verifiers(self.trusted_verifier_keys,
                                                                                  self.verifier_quorum))
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ValueError(f"verify_fraction must be in [0, 1], got {self.verify_fraction}")
        for name in ("audit_fraction", "train_audit_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_retries < 0 or self.request_timeout <= 0 or self.retry_delay < 0 or self.server_view_max_age < 0:
            raise ValueError("max_retries must be >= 0, request_timeout > 0, retry_delay and server_view_max_age >= 0")
        if self.discovery_timeout <= 0:
            raise ValueError(f"discovery_timeout must be > 0, got {self.discovery_timeout}")

    @property
    def wants_receipts(self) -> bool:
        """Steps ask for receipts when sessions may be audited: some audit share and a verifier to send them to."""
        return self.audit_fraction > 0 and bool(self.trusted_verifier_keys)

    @property
    def audits_training(self) -> bool:
        """Training requests ask for receipts when some of them may be audited by a trusted verifier."""
        return self.train_audit_fraction > 0 and bool(self.trusted_verifier_keys)

    @property
    def resolved_wire_format(self) -> str:
        """The format hidden states travel in: ``wire_format``, else the model dtype."""
        return self.wire_format or self.dtype
