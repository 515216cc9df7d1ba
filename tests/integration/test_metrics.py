"""/metrics, scraped over HTTP as Prometheus would, has the series operators build dashboards on."""

from __future__ import annotations

import contextlib
import time
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from lstm_client import Client, NotFound
from tests.servers import RunningServer


def _scrape(server: RunningServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_follow_the_traffic(server: RunningServer, client: Client) -> None:
    before = _scrape(server)
    session = client.create_session("golden_l1_nohead")
    session.step(np.zeros((5, 3)))
    list(session.stream(np.zeros((3, 3))))
    with contextlib.suppress(NotFound):
        client.get_model("nope")
    session.close()
    after = _scrape(server)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("lstm_rpcs_total", method="Step", code="OK") == 1
    assert delta("lstm_rpcs_total", method="StreamSteps", code="OK") == 1
    assert delta("lstm_rpcs_total", method="GetModel", code="NOT_FOUND") == 1
    assert delta("lstm_stream_requests_total", code="OK") == 3
    assert delta("lstm_steps_total", model="golden_l1_nohead") == 8
    assert delta("lstm_sessions_created_total", model="golden_l1_nohead") == 1
    assert delta("lstm_sessions_ended_total", model="golden_l1_nohead", reason="closed") == 1
    assert delta("lstm_rpc_duration_seconds_count", method="Step") == 1
    assert delta("lstm_batch_size_count", model="golden_l1_nohead") == 4
    assert _value(after, "lstm_sessions_active", model="elnino") >= 0
    assert ("lstm_sessions_active", frozenset({("model", "golden_l1_nohead")})) in after
    assert _value(after, "lstm_models_loaded") == 5
    assert _value(after, "lstm_model_load_failures") == 1
    assert _value(after, "process_resident_memory_bytes") > 0


def _gauge_settles(server: RunningServer, expected: float, model: str) -> tuple[float, float]:
    """The gauge is refreshed from the store at every sweep (0.1 s in tests): poll a bounded number of times. Sessions
    that earlier tests (the fuzzers) left with short idle TTLs may expire meanwhile: the gauge is compared with
    `expected` less the sessions of the model that expired since the test began. Returns (gauge, that target)."""
    for _ in range(50):
        metrics = _scrape(server)
        value = _value(metrics, "lstm_sessions_active", model=model)
        target = expected - _expired(metrics, model)
        if value == target:
            break
        time.sleep(0.05)
    return value, target


def _expired(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], model: str) -> float:
    return metrics.get(("lstm_sessions_ended_total", frozenset({("model", model), ("reason", "expired")})), 0.0)


def test_active_sessions_gauge(server: RunningServer, client: Client) -> None:
    time.sleep(0.25)  # a few sweeps: the gauge holds whatever earlier tests left
    metrics = _scrape(server)
    before = _value(metrics, "lstm_sessions_active", model="golden_l2_wide") + _expired(metrics, "golden_l2_wide")
    sessions = [client.create_session("golden_l2_wide") for _ in range(3)]
    value, target = _gauge_settles(server, before + 3, "golden_l2_wide")
    assert value == target
    for s in sessions:
        s.close()
    value, target = _gauge_settles(server, before, "golden_l2_wide")
    assert value == target
