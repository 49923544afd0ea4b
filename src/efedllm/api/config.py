"""The API server's frozen configuration; ``efedllm api`` only builds it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from efedllm.client.config import RemoteClientConfig


@dataclass(frozen=True)
class ApiConfig:
    """``efedllm api``: an OpenAI-compatible server and web UI over a swarm.

    ``model`` is the id requests must name; ``api_key`` (None: open) is checked on every ``/v1`` request;
    ``max_rows`` choices of all requests generate together (continuous batching), ``max_pending``
    requests may wait beyond them (more: 429); ``default_max_tokens`` bounds a request that names no
    ``max_tokens`` (OpenAI's default runs to the context's end, which on a CPU swarm is minutes);
    ``max_context`` caps prompt + completion tokens (None: the model's ``max_position_embeddings``);
    ``ledger_path``: a verifier's ledger whose balances the monitor shows (None: none shown);
    ``probe_interval``: seconds between the monitor's own measurements of each server (0: never).
    """

    model: str
    initial_peers: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_rows: int = 32
    max_pending: int = 64
    default_max_tokens: int = 256
    max_context: int | None = None
    ledger_path: str | None = None
    probe_interval: float = 15.0
    client: RemoteClientConfig = field(default_factory=RemoteClientConfig)

    def __post_init__(self) -> None:
        if not self.initial_peers:
            raise ValueError("the API needs --initial-peers of a swarm")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(f"--host must be an IP address such as 127.0.0.1, got {self.host!r}") from None
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.api_key is not None and (not self.api_key or any(ch.isspace() for ch in self.api_key)):
            raise ValueError("--api-key must be non-empty and hold no whitespace")
        if min(self.max_rows, self.max_pending, self.default_max_tokens) < 1:
            raise ValueError("max_rows, max_pending and default_max_tokens must be >= 1")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")
        if self.probe_interval < 0:
            raise ValueError(f"probe_interval must be >= 0, got {self.probe_interval}")
