"""What Metrics records, read back through its registry's exposition as Prometheus would read it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lstm_serve.config import Settings
from lstm_serve.metrics import BATCH_BUCKETS, Metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(metrics: Metrics) -> Samples:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


def test_batch_timing_splits_a_batch_by_model() -> None:
    metrics = Metrics()
    metrics.batch_timing("a", 4, 0.003, 0.0004, 0.002)
    metrics.batch_timing("a", 1, 0.001, 0.0002, 0.0)
    metrics.batch_timing("b", 2, 0.0, 0.1, 0.0)
    samples = _samples(metrics)
    a, b = frozenset({("model", "a")}), frozenset({("model", "b")})
    assert samples[("lstm_step_wait_seconds_count", a)] == 2
    assert samples[("lstm_step_wait_seconds_sum", a)] == pytest.approx(0.004)
    assert samples[("lstm_step_compute_seconds_sum", a)] == pytest.approx(0.0006)
    assert samples[("lstm_step_store_seconds_sum", a)] == pytest.approx(0.002)
    assert samples[("lstm_step_compute_seconds_count", b)] == 1
    assert samples[("lstm_step_compute_seconds_sum", b)] == pytest.approx(0.1)
    # the series are looked up once and kept: the step path pays a dict lookup, not labels()
    assert metrics.child(metrics.step_wait, "a") is metrics.child(metrics.step_wait, "a")


def test_batch_size_buckets_answer_how_much_batching() -> None:
    """Whole-number buckets: the share of single-step batches is exact, and p90 of all-ones is 1, not 0.9."""
    metrics = Metrics()
    observe = metrics.batch_size.labels(model="m").observe
    for size in [1] * 7 + [2, 3, 5]:
        observe(size)
    samples = _samples(metrics)

    def bucket(le: str) -> float:
        return samples[("lstm_batch_size_bucket", frozenset({("model", "m"), ("le", le)}))]

    assert BATCH_BUCKETS[:4] == (1, 2, 3, 4)
    assert bucket("1.0") == 7
    assert bucket("2.0") == 8
    assert bucket("4.0") == 9
    assert bucket("6.0") == 10


def test_stream_series_count_codes_and_time_requests() -> None:
    metrics = Metrics()
    series = metrics.stream_series("StreamSteps")
    series.answered("OK", 0.002)
    series.answered("INTERNAL", 0.5)
    series.answered("OUT_OF_RANGE", 0.001)
    samples = _samples(metrics)

    def requests(code: str) -> float:
        return samples[("lstm_stream_requests_total", frozenset({("method", "StreamSteps"), ("code", code)}))]

    assert (requests("OK"), requests("INTERNAL"), requests("OUT_OF_RANGE"), requests("NOT_FOUND")) == (1, 1, 1, 0)
    method = frozenset({("method", "StreamSteps")})
    assert samples[("lstm_stream_request_seconds_count", method)] == 3
    assert samples[("lstm_stream_request_seconds_sum", method)] == pytest.approx(0.503)


def test_grpc_series_carry_the_ecosystem_labels() -> None:
    metrics = Metrics()
    series = metrics.grpc_series("lstm.v1.LstmService", "Step", "unary")
    assert metrics.grpc_series("lstm.v1.LstmService", "Step", "unary") is series
    series.started.inc()
    series.handled(grpc.StatusCode.DATA_LOSS.name).inc()
    samples = _samples(metrics)
    labels = {("grpc_service", "lstm.v1.LstmService"), ("grpc_method", "Step"), ("grpc_type", "unary")}
    assert samples[("grpc_server_started_total", frozenset(labels))] == 1
    assert samples[("grpc_server_handled_total", frozenset({*labels, ("grpc_code", "DATA_LOSS")}))] == 1
    assert samples[("grpc_server_handled_total", frozenset({*labels, ("grpc_code", "INTERNAL")}))] == 0


def test_model_info_follows_the_versions_served() -> None:
    metrics = Metrics()
    metrics.models_served([("a", 1, "numpy", "ready"), ("b", 2, "onnx", "ready")])
    metrics.models_served([("a", 1, "numpy", "unloading"), ("a", 2, "numpy", "ready"), ("b", 2, "onnx", "ready")])
    info = {
        dict(labels)["model"] + "/" + dict(labels)["version"] + ":" + dict(labels)["state"]: value
        for (name, labels), value in _samples(metrics).items()
        if name == "lstm_model_info"
    }
    assert info == {"a/1:unloading": 1, "a/2:ready": 1, "b/2:ready": 1}
    ended = {(n, labels) for (n, labels) in _samples(metrics) if n == "lstm_sessions_ended_total"}
    assert len(ended) == 2 * 3  # every model's reasons at zero


def test_metrics_off_records_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """LSTM_SERVE_METRICS=off: the diagnostic that measures what the metrics cost. Nothing the server records shows;
    the settings, which forbid unknown LSTM_SERVE_ variables, still load."""
    monkeypatch.setenv("LSTM_SERVE_METRICS", "off")
    Settings(model_dir=Path("."))  # type: ignore[call-arg]
    metrics = Metrics()
    assert not metrics.enabled
    metrics.rpc_finished("Step", "OK", 0.001)
    metrics.batch_timing("a", 3, 0.001, 0.001, 0.001)
    metrics.stream_series("StreamSteps").answered("OK", 0.001)
    metrics.grpc_series("s", "m", "unary").handled("OK").inc()
    metrics.child(metrics.steps, "a").inc()
    metrics.batch_size.labels(model="a").observe(3)
    metrics.models_served([("a", 1, "numpy", "ready")])
    metrics.watch_calls(lambda: 1.0, lambda: 1.0, lambda: 0.0)
    names = {name for name, _ in _samples(metrics)}
    assert not {n for n in names if n.startswith(("lstm_", "grpc_")) and n != "lstm_build_info"}, names
    build = next(dict(labels) for name, labels in _samples(metrics) if name == "lstm_build_info")
    assert build["metrics"] == "off"
    assert Metrics(enabled=True).enabled
