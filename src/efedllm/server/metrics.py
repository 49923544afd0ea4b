"""A server's Prometheus metrics (``efedllm serve --metrics-port``), in a registry of its own.

The servicer reports each computed step (``on_step``) and each refused request (``on_rejected``,
with a reason from :func:`rejection_reason`); the gauges read the server's current servicer when
scraped, so they follow it across span moves. Call order: ``watch(server)``, ``start_http``,
``shutdown``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from efedllm.common.errors import RecordError
from efedllm.models.sessions import SpanInputError, UnknownSessionError
from efedllm.server.admission import AccessError, AdmissionError

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


def rejection_reason(error: BaseException) -> str:
    """The ``reason`` label of a refused request."""
    if isinstance(error, AdmissionError):
        return "admission"  # cache budget, session or per-peer limits
    if isinstance(error, AccessError):
        return "access"  # not the session's owner or upstream
    if isinstance(error, UnknownSessionError):
        return "unknown_session"
    if isinstance(error, (RecordError, SpanInputError)):
        return "invalid"
    return "internal"


class NoMetrics:
    """What a servicer reports to when no metrics are kept."""

    def on_step(self, rows: int, tokens: int, seconds: float) -> None:
        pass

    def on_rejected(self, reason: str) -> None:
        pass


class ServerMetrics(NoMetrics):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.steps = Counter("efedllm_server_steps", "steps computed (one session's step each)", registry=self.registry)
        self.tokens = Counter("efedllm_server_tokens", "rows x tokens computed through the span", registry=self.registry)
        self.step_seconds = Histogram("efedllm_server_step_seconds", "a step's wait and compute in the batcher",
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.rejected = Counter("efedllm_server_rejected_requests", "requests refused, by reason", ["reason"],
                                registry=self.registry)
        self.open_sessions = Gauge("efedllm_server_open_sessions", "sessions open now", registry=self.registry)
        self.cache_used = Gauge("efedllm_server_cache_reserved_bytes", "KV-cache bytes reserved by open sessions",
                                registry=self.registry)
        self.cache_budget = Gauge("efedllm_server_cache_budget_bytes", "KV-cache budget", registry=self.registry)
        self.passes = Gauge("efedllm_server_batch_passes", "forward passes run by the step batcher (since the span loaded)",
                            registry=self.registry)
        self._http = None

    def watch(self, server) -> None:
        """Gauges read ``server.servicer`` (None while loading) when scraped."""
        def servicer_value(read):
            return lambda: read(server.servicer) if server.servicer is not None else 0
        self.open_sessions.set_function(servicer_value(lambda servicer: len(servicer.leases)))
        self.cache_used.set_function(servicer_value(lambda servicer: sum(lease.reserved_bytes
                                                                         for lease in servicer.leases.values())))
        self.cache_budget.set_function(servicer_value(lambda servicer: servicer.policy.budget_bytes))
        self.passes.set_function(servicer_value(lambda servicer: servicer.batcher.passes))

    def on_step(self, rows: int, tokens: int, seconds: float) -> None:
        self.steps.inc()
        self.tokens.inc(rows * tokens)
        self.step_seconds.observe(seconds)

    def on_rejected(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    def start_http(self, host: str, port: int) -> int:
        """Serves ``/metrics`` on ``host:port`` (0: any free port); returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http = None
