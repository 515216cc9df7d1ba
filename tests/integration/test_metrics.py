"""/metrics, scraped over HTTP as Prometheus would, has the series operators build dashboards on."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from lstm_client import Client, NotFound
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client.tensor import to_tensor
from lstm_serve.metrics import CALLER_CODES, SERVER_CODES
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
    assert delta("lstm_stream_requests_total", method="StreamSteps", code="OK") == 3
    assert delta("lstm_stream_request_seconds_count", method="StreamSteps") == 3
    v1 = {"grpc_service": "lstm.v1.LstmService", "grpc_type": "unary"}
    assert delta("grpc_server_started_total", grpc_method="Step", **v1) == 1
    assert delta("grpc_server_handled_total", grpc_method="Step", grpc_code="OK", **v1) == 1
    assert delta("grpc_server_handling_seconds_count", grpc_method="Step", **v1) == 1
    assert delta("grpc_server_msg_received_total", grpc_method="Step", **v1) == 1
    assert delta("grpc_server_msg_sent_total", grpc_method="Step", **v1) == 1
    assert delta("grpc_server_handled_total", grpc_method="GetModel", grpc_code="NOT_FOUND", **v1) == 1
    assert delta("grpc_server_msg_sent_total", grpc_method="GetModel", **v1) == 0  # no reply, only a status
    stream = {**v1, "grpc_type": "bidi_stream", "grpc_method": "StreamSteps"}
    assert delta("grpc_server_started_total", **stream) == 1
    assert delta("grpc_server_msg_received_total", **stream) == 3
    assert delta("grpc_server_msg_sent_total", **stream) == 3
    assert delta("grpc_server_handled_total", grpc_code="OK", **stream) == 1
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


def test_error_series_exist_before_any_error(server: RunningServer) -> None:
    """Alerts compute rates over these: a series born with its first error would hide that first error's rate."""
    metrics = _scrape(server)
    for code in (*CALLER_CODES, *SERVER_CODES):
        for method, service in (
            ("ForkSession", "lstm.v1.LstmService"),
            ("ServerMetadata", "inference.GRPCInferenceService"),
        ):
            labels = {"grpc_service": service, "grpc_method": method, "grpc_type": "unary", "grpc_code": code}
            assert ("grpc_server_handled_total", frozenset(labels.items())) in metrics, labels
        for method in ("StreamSteps", "ModelStreamInfer"):
            assert ("lstm_stream_requests_total", frozenset({("method", method), ("code", code)})) in metrics
    for reason in ("closed", "expired", "evicted"):
        assert ("lstm_sessions_ended_total", frozenset({("model", "elnino"), ("reason", reason)})) in metrics


def test_build_and_model_info(server: RunningServer, client: Client) -> None:
    metrics = _scrape(server)
    builds = [dict(labels) for name, labels in metrics if name == "lstm_build_info"]
    assert len(builds) == 1
    assert builds[0]["python"].count(".") == 2
    assert builds[0]["grpc"] == grpc.__version__
    assert builds[0]["numpy"] == np.__version__
    assert builds[0]["metrics"] == "on"
    infos: dict[tuple[str, str, str, str], float] = {}
    for (name, labels), value in metrics.items():
        if name == "lstm_model_info":
            d = dict(labels)
            infos[(d["model"], d["version"], d["backend"], d["state"])] = value
    served = {(m.name, m.version, m.backend, m.state) for m in client.list_models()}
    assert served, "the test repository serves models"
    assert set(infos) == served
    assert set(infos.values()) == {1.0}


def test_stream_requests_are_timed_and_their_errors_counted(server: RunningServer, client: Client) -> None:
    """Each request of a stream: its own latency and in-band code, and the stream's gauges while it is open."""
    session = client.create_session("golden_l1_nohead")
    before = _scrape(server)
    requests: queue.Queue[lstm_pb2.StepRequest | None] = queue.Queue()

    def feed() -> Iterator[lstm_pb2.StepRequest]:
        while (item := requests.get(timeout=20)) is not None:
            yield item

    with grpc.insecure_channel(server.target) as channel:
        replies = lstm_pb2_grpc.LstmServiceStub(channel).StreamSteps(feed(), timeout=30)  # type: ignore[no-untyped-call]
        requests.put(lstm_pb2.StepRequest(session_id=session.id, seq=1, inputs=to_tensor(np.zeros(3))))
        first = next(replies)
        assert first.seq == 1
        for _ in range(40):  # the stream is open: it counts as a call in flight (sampled 4 times a second)
            open_now = _scrape(server)
            if _value(open_now, "lstm_streams_open") >= 1:
                break
            time.sleep(0.05)
        assert _value(open_now, "lstm_streams_open") >= 1
        assert _value(open_now, "lstm_calls_in_flight") >= 1
        assert _value(open_now, "lstm_draining") == 0
        requests.put(lstm_pb2.StepRequest(session_id="no-such-session", seq=1, inputs=to_tensor(np.zeros(3))))
        requests.put(lstm_pb2.StepRequest(session_id=session.id, seq=2, inputs=to_tensor(np.zeros(5))))
        second, third = next(replies), next(replies)
        requests.put(None)
        assert list(replies) == []
    assert {second.error.code, third.error.code} == {grpc.StatusCode.NOT_FOUND.value[0], 3}  # 3: INVALID_ARGUMENT
    after = _scrape(server)
    session.close()

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("lstm_stream_requests_total", method="StreamSteps", code="OK") == 1
    assert delta("lstm_stream_requests_total", method="StreamSteps", code="NOT_FOUND") == 1
    assert delta("lstm_stream_requests_total", method="StreamSteps", code="INVALID_ARGUMENT") == 1
    assert delta("lstm_stream_request_seconds_count", method="StreamSteps") == 3
    seconds = delta("lstm_stream_request_seconds_sum", method="StreamSteps")
    assert 0 < seconds < 30


def test_event_loop_lag_is_sampled(server: RunningServer) -> None:
    before = _value(_scrape(server), "lstm_event_loop_lag_seconds_count")
    time.sleep(1.0)  # four samples a second
    after = _scrape(server)
    assert _value(after, "lstm_event_loop_lag_seconds_count") - before >= 2
    assert _value(after, "lstm_event_loop_lag_seconds_sum") >= 0


def test_a_blocked_event_loop_shows_as_lag(server: RunningServer) -> None:
    """The overload signal: a loop busy for 0.6 s wakes the sampler (due every 0.25 s) at least 0.35 s late."""
    first = _scrape(server)  # one scrape for both: a sample between two would count as on time only
    before = _value(first, "lstm_event_loop_lag_seconds_bucket", le="0.25")
    count_before = _value(first, "lstm_event_loop_lag_seconds_count")
    loop = server.loop
    blocked = threading.Event()

    def block() -> None:
        time.sleep(0.6)
        blocked.set()

    loop.call_soon_threadsafe(block)
    assert blocked.wait(10)
    time.sleep(0.5)
    after = _scrape(server)
    late = (_value(after, "lstm_event_loop_lag_seconds_count") - count_before) - (
        _value(after, "lstm_event_loop_lag_seconds_bucket", le="0.25") - before
    )
    assert late >= 1, "no sample above 0.25 s after blocking the loop for 0.6 s"
