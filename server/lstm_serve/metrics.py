"""Prometheus metrics. A Metrics object owns its registry and is passed to whoever records; no module globals, so
tests and several servers in one process never collide."""

from __future__ import annotations

import threading
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from lstm_serve import __version__

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build = Info("lstm_build", "Version of the running server.", registry=r)
        self.build.info({"version": __version__})
        self.rpcs = Counter(
            "lstm_rpcs", "RPCs finished, by method and gRPC status code.", ["method", "code"], registry=r
        )
        self.rpc_duration = Histogram(
            "lstm_rpc_duration_seconds",
            "Time from receiving an RPC to its last reply, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stream_requests = Counter(
            "lstm_stream_requests",
            "StreamSteps requests answered in-band, by gRPC status code.",
            ["code"],
            registry=r,
        )
        self.steps = Counter("lstm_steps", "Time steps computed for sessions, by model.", ["model"], registry=r)
        self.replayed_steps = Counter(
            "lstm_replayed_steps",
            "Retried steps answered from the stored reply without recomputing, by model.",
            ["model"],
            registry=r,
        )
        # Set from the store at every sweep: with Redis the count is store-wide, the same for every worker and replica.
        self.sessions_active = Gauge(
            "lstm_sessions_active",
            "Live sessions, by model (store-wide; refreshed every sweep interval).",
            ["model"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.session_store_bytes = Gauge(
            "lstm_session_store_bytes",
            "Memory the sessions take: their records in this process (bounded by --max-session-bytes), or, with "
            "Redis, Redis's used memory. Refreshed every sweep interval.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.sessions_created = Counter("lstm_sessions_created", "Sessions created, by model.", ["model"], registry=r)
        self.sessions_ended = Counter(
            "lstm_sessions_ended",
            "Sessions ended, by model and reason (closed, expired, evicted).",
            ["model", "reason"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "lstm_store_seconds",
            "Round trips to a shared session store (Redis), by operation: commit and load carry whole batches.",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "lstm_store_errors",
            "Session store calls that failed (store unreachable, timed out, out of memory), by operation.",
            ["op"],
            registry=r,
        )
        self.store_batch = Histogram(
            "lstm_store_batch_size",
            "Sessions per commit or load sent to a shared store in one round trip.",
            ["op"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.commit_conflicts = Counter(
            "lstm_commit_conflicts",
            "Steps whose commit found the session changed elsewhere (another replica, a reset) and were decided again.",
            ["model"],
            registry=r,
        )
        self.store_up = Gauge(
            "lstm_store_up",
            "1 while the session store answers (readiness follows it), 0 while it does not.",
            registry=r,
            multiprocess_mode="min",
        )
        self.batch_size = Histogram(
            "lstm_batch_size",
            "Sessions per batched backend call, by model.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.models_loaded = Gauge("lstm_models_loaded", "Models being served.", registry=r, multiprocess_mode="max")
        self.model_load_failures = Gauge(
            "lstm_model_load_failures",
            "Models in the repository that failed to load.",
            registry=r,
            multiprocess_mode="max",
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def child(self, metric: Any, *label_values: str) -> Any:
        """`metric.labels(*label_values)`, cached: `labels()` costs microseconds, too much on the step path."""
        key = (id(metric), label_values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*label_values)
        return found

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        self.child(self.rpcs, method, code).inc()
        self.child(self.rpc_duration, method).observe(seconds)

    def stream_request(self, code: str) -> None:
        self.child(self.stream_requests, code).inc()

    def store_call(self, op: str, seconds: float, items: int, ok: bool) -> None:
        """One round trip to a shared store (the Redis store reports each of its calls here)."""
        self.child(self.store_seconds, op).observe(seconds)
        if items > 1 or op in ("commit", "load"):
            self.child(self.store_batch, op).observe(items)
        if not ok:
            self.child(self.store_errors, op).inc()

    def session_ended(self, model: str, reason: str) -> None:
        """Counted by the one process that ended the session (with Redis: whose script did)."""
        self.sessions_ended.labels(model=model, reason=reason).inc()

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics over HTTP in a background thread; returns the bound port (useful with port 0)."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
