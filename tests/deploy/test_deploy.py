"""The deployment configuration, proven with the real programs: docker-compose, promtool, Prometheus.

The tools come from Debian's packages (.ci/run installs them). Outside CI a missing tool skips its test; in CI
(CI=true) it fails, so a broken install can never pass as green.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from lstm_client import Client, InvalidArgument, ServerError
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client.tensor import to_tensor
from tests.golden import REPO
from tests.procs import free_port, require
from tests.servers import RunningServer

DEPLOY = REPO / "deploy"
RATE_WINDOW = "30s"  # stands in for Grafana's $__rate_interval


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DEPLOY / "grafana" / "dashboards" / "lstm-serve.json").read_text())
    return loaded


def _alerts() -> dict[str, str]:
    """alerts.yml's alerts: name -> expression."""
    loaded = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return {rule["alert"]: rule["expr"] for group in loaded["groups"] for rule in group["rules"]}


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]


PUBLISH_VARIABLES = ("LSTM_SERVE_PUBLISH", "PROMETHEUS_PUBLISH", "GRAFANA_PUBLISH")


def _compose_config(**env: str) -> str:
    compose = require("docker-compose")
    environ = {k: v for k, v in os.environ.items() if k not in PUBLISH_VARIABLES} | env
    result = subprocess.run(
        [compose, "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _published(config: str) -> list[str]:
    """The entries of every `ports:` list in `docker-compose config`'s output ("127.0.0.1:50051:50051/tcp")."""
    entries, in_ports = [], False
    for line in config.splitlines():
        if line.strip() == "ports:":
            in_ports = True
        elif in_ports and line.lstrip().startswith("- "):
            entries.append(line.strip()[2:].strip("'\""))
        else:
            in_ports = False
    return entries


def test_compose_file_is_valid() -> None:
    config = _compose_config()
    for service in ("redis:", "lstm-serve-1:", "lstm-serve-2:", "nginx:", "prometheus:", "grafana:"):
        assert service in config
    assert config.count("LSTM_SERVE_STORE: redis://redis:6379/0") == 2  # both replicas share the one Redis


def test_compose_publishes_every_port_on_loopback_only_unless_told_otherwise() -> None:
    published = _published(_compose_config())
    assert sorted(published) == ["127.0.0.1:3000:3000/tcp", "127.0.0.1:50051:50051/tcp", "127.0.0.1:9090:9090/tcp"]
    opened = _published(_compose_config(LSTM_SERVE_PUBLISH="0.0.0.0"))  # the documented override
    assert "0.0.0.0:50051:50051/tcp" in opened
    assert sum(entry.startswith("127.0.0.1:") for entry in opened) == 2  # Prometheus and Grafana stay local


def test_promtool_accepts_config_and_rules() -> None:
    promtool = require("promtool")
    config = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")], capture_output=True, text=True
    )
    assert config.returncode == 0, config.stdout + config.stderr
    rules = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")], capture_output=True, text=True
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in rules.stdout


def test_promtool_accepts_the_live_metrics(server: RunningServer, client: Client) -> None:
    promtool = require("promtool")
    with client.create_session("golden_l1_nohead") as session:
        session.step(np.zeros(3))
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert result.stdout.decode().strip() == "", result.stdout.decode()  # no naming-convention complaints


def test_dashboard_json_is_generated_from_its_script() -> None:
    spec = importlib.util.spec_from_file_location("make_dashboard", DEPLOY / "grafana" / "make_dashboard.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.dashboard() == _dashboard(), "run: python deploy/grafana/make_dashboard.py"


@pytest.fixture
def prometheus(server: RunningServer, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus with the deployment's config, pointed at the test server and sped up for a test."""
    binary = require("prometheus")
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    replicas = '["lstm-serve-1:9464", "lstm-serve-2:9464"]'
    assert replicas in config
    config = config.replace(replicas, f'["127.0.0.1:{server.app.metrics_port}"]')
    config = re.sub(r"(scrape|evaluation)_interval: \S+", r"\1_interval: 1s", config)
    config = config.replace("- alerts.yml", f"- {DEPLOY / 'prometheus' / 'alerts.yml'}")
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115 - closed with the process
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail(f"Prometheus not ready: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def _api(url: str, path: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{query}", timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_scrapes_the_server_and_every_expression_evaluates(
    prometheus: str, server: RunningServer, client: Client
) -> None:
    deadline = time.monotonic() + 60
    steps_rate: list[Any] = []
    while time.monotonic() < deadline and not steps_rate:
        with client.create_session("golden_l3_head") as session:  # traffic, bounded: 20 steps per round
            for _ in range(20):
                session.step(np.zeros(4))
        time.sleep(0.5)
        steps_rate = _api(prometheus, "query", query=f"sum(rate(lstm_steps_total[{RATE_WINDOW}])) > 0")["result"]
    assert steps_rate, "no step rate arrived in Prometheus within 60 s"
    assert float(steps_rate[0]["value"][1]) > 0

    up = _api(prometheus, "query", query='up{job="lstm-serve"}')["result"]
    assert [float(s["value"][1]) for s in up] == [1.0]

    for expr in _dashboard_exprs():
        data = _api(prometheus, "query", query=expr.replace("$__rate_interval", RATE_WINDOW))
        assert data["resultType"] == "vector", expr
        assert data["result"], f"no series for the dashboard expression {expr}"

    deadline = time.monotonic() + 30
    while True:  # wait until every rule has been evaluated at least once
        groups = _api(prometheus, "rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("2") and r["health"] != "unknown" for r in rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.5)
    assert len(rules) == len(_alerts()) == 10
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert bad == {}


def _firing(prometheus: str, alert: str) -> list[Any]:
    """The alert's expression, evaluated now: the series it would fire for (after its `for:`)."""
    result: list[Any] = _api(prometheus, "query", query=_alerts()[alert])["result"]
    return result


def _until(prometheus: str, query: str, seconds: float = 30) -> list[Any]:
    """Polls a query (bounded) until it has a result: Prometheus scrapes every second here."""
    deadline = time.monotonic() + seconds
    while not (found := _api(prometheus, "query", query=query)["result"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert found, f"no result within {seconds:g} s for {query}"
    result: list[Any] = found
    return result


def _until_firing(prometheus: str, alert: str) -> list[Any]:
    return _until(prometheus, _alerts()[alert])


def _stream(server: RunningServer, requests: list[lstm_pb2.StepRequest]) -> list[lstm_pb2.StepReply]:
    with grpc.insecure_channel(server.target) as channel:
        return list(lstm_pb2_grpc.LstmServiceStub(channel).StreamSteps(iter(requests), timeout=60))  # type: ignore[no-untyped-call]


def _step(session_id: str, seq: int, x: np.ndarray) -> lstm_pb2.StepRequest:
    return lstm_pb2.StepRequest(session_id=session_id, seq=seq, inputs=to_tensor(x))


def test_alerts_tell_caller_faults_from_server_faults_and_see_overload(
    prometheus: str, server: RunningServer, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Faults injected into a running server, one kind at a time, each seen by the alert meant for it (its expression
    non-empty in a real Prometheus scraping the server) and not by the others."""
    model = "golden_l3_head"  # input size 4; small, so it computes on the event loop
    _until(prometheus, 'up{job="lstm-serve"} == 1')  # scraped once before any fault: rates start from there
    with client.create_session(model) as session:  # healthy traffic first
        for _ in range(20):
            session.step(np.zeros(4))
    _until(prometheus, f"sum(rate(lstm_steps_total[{RATE_WINDOW}])) > 0")
    for alert in ("LstmServeServerErrors", "LstmServeCallerErrors", "LstmServeInternalErrors"):
        assert _firing(prometheus, alert) == [], alert

    # 1. The caller's mistakes: wrong input sizes (INVALID_ARGUMENT), steps of sessions that do not exist, in-band.
    with client.create_session(model) as session:
        for _ in range(30):
            with pytest.raises(InvalidArgument):
                session.step(np.zeros(5))
    replies = _stream(server, [_step("no-such-session", 1, np.zeros(4)) for _ in range(30)])
    assert {r.error.code for r in replies} == {grpc.StatusCode.NOT_FOUND.value[0]}
    _until_firing(prometheus, "LstmServeCallerErrors")
    assert _firing(prometheus, "LstmServeServerErrors") == []  # INVALID_ARGUMENT is no server error
    assert _firing(prometheus, "LstmServeInternalErrors") == []

    # 2. A failing backend, seen first in a stream only (answered in-band), then by a unary call.
    backend = server.app.plane.model(model).backend

    def failing(*args: object) -> object:
        raise RuntimeError("simulated backend failure (test)")

    with client.create_session(model) as session:
        monkeypatch.setattr(backend, "step", failing)
        replies = _stream(server, [_step(session.id, 1, np.zeros(4))])
        assert [r.error.code for r in replies] == [grpc.StatusCode.INTERNAL.value[0]]
        _until_firing(prometheus, "LstmServeInternalErrors")
        _until_firing(prometheus, "LstmServeServerErrors")
        with pytest.raises(ServerError):
            session.step(np.zeros(4))
        monkeypatch.undo()
        session.step(np.zeros(4))

    # 3. Overload: a backend that takes 0.2 s a step, on the event loop, delays stream requests and the loop alike.
    slow_step = backend.step

    def slow(*args: Any) -> Any:
        time.sleep(0.2)
        return slow_step(*args)

    with client.create_session(model) as streamed, client.create_session(model) as session:
        monkeypatch.setattr(backend, "step", slow)
        replies = _stream(server, [_step(streamed.id, seq, np.zeros(4)) for seq in range(1, 11)])
        assert [r.error.code for r in replies] == [0] * 10
        for _ in range(5):
            session.step(np.zeros(4))
        monkeypatch.undo()
    _until_firing(prometheus, "LstmServeStreamRequestLatencyHigh")
    _until_firing(prometheus, "LstmServeOverloaded")
    _until_firing(prometheus, "LstmServeStepLatencyHigh")

    # and every dashboard expression has data after this traffic
    for expr in _dashboard_exprs():
        data = _api(prometheus, "query", query=expr.replace("$__rate_interval", RATE_WINDOW))
        assert data["result"], f"no series for the dashboard expression {expr}"
