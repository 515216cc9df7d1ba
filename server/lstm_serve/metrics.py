"""Prometheus metrics. A Metrics object owns its registry and is passed to whoever records; no module globals, so
tests and several servers in one process never collide.

Recording sits on the step path, so every series recorded per step or per message is looked up once (`child`, or the
per-method bundles `GrpcSeries` and `StreamSeries`) and kept. `LSTM_SERVE_METRICS=off` in the environment makes every
metric a no-op (a diagnostic: `make bench` measures the metrics' own cost with it)."""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Callable
from importlib import metadata
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
# Batch sizes are whole numbers: a bucket per small size, so that the share of batches of one step
# (bucket le="1" / count) and the quantiles above it are exact rather than interpolated inside (0, 1].
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Status codes that are the caller's doing, and those that are the server's (alerts.yml splits errors the same way;
# RESOURCE_EXHAUSTED, the limits, is alerted on by itself).
CALLER_CODES = (
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "ALREADY_EXISTS",
    "OUT_OF_RANGE",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
)
SERVER_CODES = ("INTERNAL", "UNKNOWN", "DATA_LOSS", "UNAVAILABLE", "UNIMPLEMENTED", "DEADLINE_EXCEEDED")
COMMON_CODES = ("OK", "CANCELLED", *CALLER_CODES, *SERVER_CODES)  # series created at zero, before any event
SESSION_END_REASONS = ("closed", "expired", "evicted")
STREAM_METHODS = ("StreamSteps", "ModelStreamInfer")


def enabled_by_environment() -> bool:
    return os.environ.get("LSTM_SERVE_METRICS", "on").strip().lower() not in ("off", "0", "false", "no")


class _Off:
    """Stands in for every metric while metrics are off: records nothing, costs a call."""

    def labels(self, *args: object, **kwargs: object) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass

    def set_function(self, f: Callable[[], float]) -> None:
        pass

    def info(self, value: dict[str, str]) -> None:
        pass

    def remove(self, *labels: str) -> None:
        pass


OFF = _Off()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def build_labels() -> dict[str, str]:
    """lstm_build_info's labels: this server's version and the libraries that compute and serve."""
    return {
        "version": __version__,
        "python": platform.python_version(),
        "grpc": _version("grpcio"),
        "numpy": _version("numpy"),
        "onnxruntime": _version("onnxruntime"),
    }


class GrpcSeries:
    """One method's grpc_server_* series (the grpc-ecosystem names), looked up once when the method is registered or
    a stream opens; `handled(code)` for the codes of COMMON_CODES is a dict lookup."""

    __slots__ = ("_handled", "_labels", "_metrics", "received", "seconds", "sent", "started")

    def __init__(self, metrics: Metrics, service: str, method: str, kind: str) -> None:
        labels = (service, method, kind)
        self._metrics, self._labels = metrics, labels
        self.started = metrics.grpc_started.labels(*labels)
        self.seconds = metrics.grpc_seconds.labels(*labels)
        self.received = metrics.grpc_received.labels(*labels)
        self.sent = metrics.grpc_sent.labels(*labels)
        self._handled = {code: metrics.grpc_handled.labels(*labels, code) for code in COMMON_CODES}

    def handled(self, code: str) -> Any:
        found = self._handled.get(code)
        if found is None:
            found = self._handled[code] = self._metrics.grpc_handled.labels(*self._labels, code)
        return found


class StreamSeries:
    """The in-band series of one streaming method: each request's time from arrival to its answer, and its code."""

    __slots__ = ("_codes", "_method", "_metrics", "seconds")

    def __init__(self, metrics: Metrics, method: str) -> None:
        self._metrics, self._method = metrics, method
        self.seconds = metrics.stream_request_seconds.labels(method)
        self._codes = {code: metrics.stream_requests.labels(method, code) for code in COMMON_CODES}

    def answered(self, code: str, seconds: float) -> None:
        counter = self._codes.get(code)
        if counter is None:
            counter = self._codes[code] = self._metrics.stream_requests.labels(self._method, code)
        counter.inc()
        self.seconds.observe(seconds)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, enabled: bool | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.enabled = enabled_by_environment() if enabled is None else enabled
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build = Info(
            "lstm_build",
            "Versions of the running server and of the libraries that compute and serve (value 1).",
            registry=r,
        )
        self.build.info(build_labels() | {"metrics": "on" if self.enabled else "off"})
        if not self.enabled:  # the metrics below are made in a registry nobody reads, then replaced by no-ops
            r = CollectorRegistry()
        self.model_info = Gauge(
            "lstm_model_info",
            "1 for every model version served, with its backend and state (ready, unloading); refreshed every sweep.",
            ["model", "version", "backend", "state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._model_info_labels: set[tuple[str, str, str, str]] = set()
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
            "Requests of a stream (StreamSteps, ModelStreamInfer) answered in-band, by method and gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self.stream_request_seconds = Histogram(
            "lstm_stream_request_seconds",
            "Time from a stream request's arrival to its in-band answer, by streaming method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        grpc_labels = ["grpc_service", "grpc_method", "grpc_type"]
        self.grpc_started = Counter("grpc_server_started", "RPCs started on the server.", grpc_labels, registry=r)
        self.grpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status.",
            [*grpc_labels, "grpc_code"],
            registry=r,
        )
        self.grpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from an RPC's start to its status (a stream: its whole life).",
            grpc_labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.grpc_received = Counter(
            "grpc_server_msg_received", "Messages received (each request of a stream).", grpc_labels, registry=r
        )
        self.grpc_sent = Counter(
            "grpc_server_msg_sent", "Messages sent (each reply of a stream).", grpc_labels, registry=r
        )
        self.step_wait = Histogram(
            "lstm_step_wait_seconds",
            "Time from the first step of a batch arriving in the step path to the batch starting, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_compute = Histogram(
            "lstm_step_compute_seconds",
            "Time the backend took to compute one batch, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_store = Histogram(
            "lstm_step_store_seconds",
            "Time to commit one batch's states to the session store, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.loop_lag = Histogram(
            "lstm_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled 4 times a second): the time every request waits to start.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        # Sampled with the loop lag (every 0.25 s), not kept per call: nothing on the call path, and with --workers
        # (prometheus-client's multiprocess mode) a gauge is only what was last written.
        self.calls_in_flight = Gauge(
            "lstm_calls_in_flight",
            "Unary calls in progress plus open streams (--max-concurrent-rpcs bounds it); sampled 4 times a second.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.streams_open = Gauge(
            "lstm_streams_open", "Streams open; sampled 4 times a second.", registry=r, multiprocess_mode="livesum"
        )
        self.draining = Gauge(
            "lstm_draining",
            "1 while the server drains for shutdown (its UNAVAILABLE answers are expected).",
            registry=r,
            multiprocess_mode="livemax",
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
        self._call_counts: tuple[Callable[[], float], Callable[[], float], Callable[[], float]] | None = None
        self._grpc: dict[tuple[str, str, str], GrpcSeries] = {}
        self._streams: dict[str, StreamSeries] = {}
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None
        if not self.enabled:
            for name, value in list(vars(self).items()):
                if isinstance(value, Counter | Gauge | Histogram):
                    setattr(self, name, OFF)
        for method in STREAM_METHODS:
            self.stream_series(method)

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

    def grpc_series(self, service: str, method: str, kind: str) -> GrpcSeries:
        """The grpc_server_* series of a method (`kind`: unary, bidi_stream), every common code at zero from the
        first lookup (a method's are looked up when it is registered)."""
        key = (service, method, kind)
        found = self._grpc.get(key)
        if found is None:
            found = self._grpc[key] = GrpcSeries(self, service, method, kind)
        return found

    def stream_series(self, method: str) -> StreamSeries:
        found = self._streams.get(method)
        if found is None:
            found = self._streams[method] = StreamSeries(self, method)
        return found

    def batch_timing(
        self, model: str, size: int, wait_seconds: float, compute_seconds: float, store_seconds: float
    ) -> None:
        """One computed batch of a model, from the step path: where its time went (waiting to start, the backend,
        the store). The batch size itself is lstm_batch_size, observed by the batcher."""
        self.child(self.step_wait, model).observe(wait_seconds)
        self.child(self.step_compute, model).observe(compute_seconds)
        self.child(self.step_store, model).observe(store_seconds)

    def watch_calls(
        self, in_flight: Callable[[], float], streams: Callable[[], float], draining: Callable[[], float]
    ) -> None:
        """Where the call gauges are read from (the admission gate, service/calls.py); `sample` reads them."""
        self._call_counts = (in_flight, streams, draining)
        self.sample()

    def sample(self) -> None:
        """Sets the sampled gauges (App calls it with each event-loop lag sample)."""
        if self._call_counts is not None:
            in_flight, streams, draining = self._call_counts
            self.calls_in_flight.set(in_flight())
            self.streams_open.set(streams())
            self.draining.set(draining())

    def models_served(self, versions: list[tuple[str, int, str, str]]) -> None:
        """lstm_model_info for the versions served now, (name, version, backend, state) each; every model's other
        series (session-end reasons, replays, conflicts, the step latency split) at zero from the start."""
        labels = {(name, str(version), backend, state) for name, version, backend, state in versions}
        for gone in self._model_info_labels - labels:
            self.model_info.labels(*gone).set(0)  # what a worker's file keeps under --workers
            self.model_info.remove(*gone)
        for new in labels - self._model_info_labels:
            self.model_info.labels(*new).set(1)
            name = new[0]
            for reason in SESSION_END_REASONS:
                self.child(self.sessions_ended, name, reason)
            for metric in (self.replayed_steps, self.commit_conflicts, self.step_wait, self.step_compute):
                self.child(metric, name)
            self.child(self.step_store, name)
        self._model_info_labels = labels

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
