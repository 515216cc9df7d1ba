"""The metrics of real server processes: with --workers (prometheus-client's multiprocess mode, merged by the
supervisor) and with the diagnostic LSTM_SERVE_METRICS=off."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from lstm_client import Client
from tests.procs import LstmServeProcess, RedisServer
from tests.servers import model_repository

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


def _sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum over the series of `name` carrying `labels` (with --workers a gauge has a series per worker pid)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def _traffic(target: str) -> None:
    with Client(target) as client:
        for _ in range(4):  # a few sessions: both workers get some
            with client.create_session("golden_l1_nohead") as session:
                session.step(np.zeros(3))
                assert len(list(session.stream(np.zeros((3, 3))))) == 3


def test_new_metrics_survive_the_multiprocess_merge(tmp_path: Path) -> None:
    models = model_repository(tmp_path / "models")
    with RedisServer(tmp_path / "redis") as redis:
        args = ("--workers", "2", "--store", redis.url, "--sweep-interval", "0.2")
        with LstmServeProcess(models, *args, log_dir=tmp_path) as server:
            _traffic(server.target)
            time.sleep(0.6)  # a few loop-lag samples and sweeps in every worker
            samples = _scrape(server.metrics_url)
    step = {"grpc_service": "lstm.v1.LstmService", "grpc_method": "Step", "grpc_type": "unary"}
    assert _sum(samples, "grpc_server_handled_total", grpc_code="OK", **step) == 4
    assert _sum(samples, "grpc_server_handled_total", grpc_code="INTERNAL", **step) == 0
    assert ("grpc_server_handled_total", frozenset({*step.items(), ("grpc_code", "INTERNAL")})) in samples
    assert _sum(samples, "lstm_stream_requests_total", method="StreamSteps", code="OK") == 12
    assert _sum(samples, "lstm_stream_request_seconds_count", method="StreamSteps") == 12
    assert _sum(samples, "lstm_event_loop_lag_seconds_count") >= 2
    assert ("lstm_calls_in_flight", frozenset()) in samples  # livesum: one series over the live workers
    assert _sum(samples, "lstm_draining") == 0
    info = {dict(ls)["model"]: v for (n, ls), v in samples.items() if n == "lstm_model_info"}
    assert info.get("golden_l1_nohead") == 1  # livemax over the workers
    build = next(dict(ls) for (n, ls), _ in samples.items() if n == "lstm_build_info")
    assert (build["workers"], build["grpc"], build["metrics"]) == ("2", grpc.__version__, "on")


def test_metrics_off_records_nothing_and_serves_as_usual(tmp_path: Path) -> None:
    models = model_repository(tmp_path / "models")
    with LstmServeProcess(models, log_dir=tmp_path, env={"LSTM_SERVE_METRICS": "off"}) as server:
        _traffic(server.target)
        samples = _scrape(server.metrics_url)
    ours = {n for n, _ in samples if n.startswith(("lstm_", "grpc_"))}
    assert ours == {"lstm_build_info"}
    build = next(dict(ls) for (n, ls), _ in samples.items() if n == "lstm_build_info")
    assert build["metrics"] == "off"
    assert _sum(samples, "process_cpu_seconds_total") > 0
