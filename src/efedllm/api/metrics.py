"""The API's Prometheus metrics, in a registry of its own (several APIs may live in one process, as in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("efedllm_api_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.tokens = Counter("efedllm_api_generated_tokens", "tokens generated for API requests", registry=self.registry)
        self.time_to_first_token = Histogram("efedllm_api_time_to_first_token_seconds", "request arrival to its first token",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.step_seconds = Histogram("efedllm_api_step_seconds", "one engine step through the swarm (all rows)",
                                      buckets=LATENCY_BUCKETS, registry=self.registry)
        self.step_rows = Histogram("efedllm_api_step_rows", "rows (choices of all requests) in one engine step",
                                   buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.rejected_requests = Counter("efedllm_api_rejected_requests", "requests refused, by reason", ["reason"],
                                         registry=self.registry)

    def watch_engine(self, engine) -> None:
        """The engine's gauges, read from one ``engine.stats()`` per scrape."""
        self.registry.register(_EngineGauges(engine))

    def observe_step(self, rows: int, seconds: float) -> None:
        self.step_seconds.observe(seconds)
        self.step_rows.observe(rows)
        self.tokens.inc(rows)

    def rejected(self, reason: str) -> None:
        self.rejected_requests.labels(reason=reason).inc()

    def answered(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineGauges:
    """A collector: the engine's rows generating now and requests waiting, both from one snapshot."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def describe(self):  # names only: registering must not read the engine
        return self._families(0, 0)

    def collect(self):
        stats = self.engine.stats()
        return self._families(stats.active_rows, stats.waiting_jobs)

    @staticmethod
    def _families(active_rows: int, waiting_jobs: int) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("efedllm_api_active_rows", "choices generating now", value=active_rows),
                GaugeMetricFamily("efedllm_api_waiting_requests", "requests waiting for room", value=waiting_jobs)]
