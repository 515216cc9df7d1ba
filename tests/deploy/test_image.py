"""The image, built and run as an operator would: `docker build`, `docker run`, the HEALTHCHECK, a session with the
real client, /metrics, `docker stop`. Needs a Docker engine (see engine.py: started here when none runs)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lstm_client import Client
from lstm_serve.engine.repository import load_model
from tests.deploy.conftest import Image, report
from tests.deploy.engine import REPO, TEST_LABEL, Engine
from tests.procs import free_port, health_status

pytestmark = pytest.mark.timeout(1800)  # the first test also builds the image (minutes on a cold machine)
PROBE_TIMEOUT = 3.0  # the HEALTHCHECK's --timeout
GRACE = 5.0  # LSTM_SERVE_SHUTDOWN_GRACE given to the container

# Everything `serve` imports; run inside the image as its user, it lists the modules loaded without bytecode.
BYTECODE_CHECK = """
import importlib.util, os, sys
import lstm_serve.cli, lstm_serve.app, lstm_serve.sessions.redis_store, lstm_serve.engine.onnx_backend
modules = [m for m in list(sys.modules.values()) if (getattr(m, "__file__", None) or "").endswith(".py")]
print(len(modules))
for m in modules:
    if not os.path.exists(importlib.util.cache_from_source(m.__file__)):
        print(m.__file__)
"""


def reference_outputs(model: str, inputs: np.ndarray) -> np.ndarray:
    """The outputs of `model` from the repository's models/, computed here with the engine, one step at a time."""
    loaded = load_model(REPO / "models" / model)
    state = loaded.zero_state()
    outputs = []
    for x in inputs:
        ((y, state),) = loaded.run_batch([x[None, :].astype(np.float32)], [state])
        outputs.append(y[0])
    return np.array(outputs)


def test_the_image_holds_no_dead_layer(docker: Engine, image: Image) -> None:
    """What the image adds to its base is the installed packages, the models and a few bytes of user database: a
    directory copied in and deleted later (the old /wheels, 65.6 MB) would show as more."""
    sizes = docker.run(
        "run", "--rm", "--network", "none", "--label", TEST_LABEL, "--entrypoint", "du", image.ref,
        "-s", "-b", "/opt/lstm-serve", "/models",
    ).stdout.split()  # fmt: skip
    payload = int(sizes[0]) + int(sizes[2])
    added = image.size - image.base_size
    report(f"image payload: /opt/lstm-serve + /models = {payload / 1e6:.1f} MB; the image adds {added / 1e6:.1f} MB")
    assert payload * 0.95 <= added <= payload * 1.02 + 2e6, (added, payload)
    history = docker.run("history", "--format", "{{.Size}}\t{{.CreatedBy}}", image.ref).stdout
    assert "/wheels" not in history, history


def test_everything_serve_imports_has_bytecode_in_the_image(docker: Engine, image: Image) -> None:
    """The runtime user cannot write .pyc files: without them each start and each health probe compiles numpy, grpc
    and pydantic again (seconds: longer than the probe's timeout)."""
    result = docker.run(
        "run", "--rm", "--network", "none", "--label", TEST_LABEL, "--entrypoint", "python3", image.ref,
        "-c", BYTECODE_CHECK,
    )  # fmt: skip
    lines = result.stdout.split()
    assert int(lines[0]) > 300, lines[:5]  # numpy, grpc, pydantic, redis, onnx... were imported
    assert lines[1:] == [], f"{len(lines) - 1} modules without bytecode: {lines[1:20]}"


@pytest.fixture
def container(docker: Engine, image: Image) -> Iterator[dict[str, Any]]:
    """The image run as its own CMD (`serve`) on the host's network, on free loopback ports, ports set through the
    environment as an operator would; removed afterwards (by name, labelled for leftovers)."""
    port, metrics_port = free_port(), free_port()
    name = f"lstm-serve-test-{port}"
    started = time.monotonic()
    docker.run(
        "run", "-d", "--name", name, "--label", TEST_LABEL, "--network", "host",
        "-e", "LSTM_SERVE_HOST=127.0.0.1", "-e", f"LSTM_SERVE_PORT={port}",
        "-e", "LSTM_SERVE_METRICS_HOST=127.0.0.1", "-e", f"LSTM_SERVE_METRICS_PORT={metrics_port}",
        "-e", f"LSTM_SERVE_SHUTDOWN_GRACE={GRACE}", image.ref,
    )  # fmt: skip
    try:
        yield {"name": name, "port": port, "metrics_port": metrics_port, "started": started}
    finally:
        logs = docker.run("logs", name, check=False).stdout + docker.run("logs", name, check=False).stderr
        docker.run("rm", "-f", name, check=False)
        print(f"----- container {name} log -----\n{logs[-4000:]}")


def _health(docker: Engine, name: str) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(docker.run("inspect", "--format", "{{json .State}}", name).stdout)
    return state


def _iso_seconds(stamp: str) -> float:
    """Seconds of the day of an RFC 3339 timestamp with nanoseconds (what docker writes), for differences."""
    clock = stamp.split("T")[1].rstrip("Z").split("+")[0]
    h, m, s = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def test_the_container_turns_healthy_serves_and_drains_on_docker_stop(
    docker: Engine, container: dict[str, Any]
) -> None:
    name, port = container["name"], container["port"]
    target = f"127.0.0.1:{port}"

    deadline = time.monotonic() + 60
    while health_status(target, service="", timeout=1.0) != "SERVING":
        assert time.monotonic() < deadline, "the server did not answer SERVING within 60 s"
        assert _health(docker, name)["Running"], "the container exited"
        time.sleep(0.1)
    serving_after = time.monotonic() - container["started"]

    # The image's own HEALTHCHECK (first probe after --interval=10s): healthy, and through the configured port.
    deadline = time.monotonic() + 60
    while (health := _health(docker, name)["Health"])["Status"] != "healthy":
        assert health["Status"] != "unhealthy", health
        assert time.monotonic() < deadline, f"not healthy within 60 s: {health}"
        time.sleep(0.2)
    healthy_after = time.monotonic() - container["started"]
    probes = health["Log"]
    assert all(p["ExitCode"] == 0 for p in probes), probes
    assert f"{target}: SERVING" in probes[-1]["Output"], probes[-1]  # it asked our port, not a fixed 50051
    probe_seconds = [_iso_seconds(p["End"]) - _iso_seconds(p["Start"]) for p in probes]
    assert max(probe_seconds) < PROBE_TIMEOUT, probe_seconds
    report(
        f"docker run -> gRPC health SERVING {serving_after:.1f} s; -> docker 'healthy' {healthy_after:.1f} s "
        f"(first HEALTHCHECK probe at --interval=10s); probe took {max(probe_seconds):.2f} s"
    )

    # A session with the real client, checked against the engine run here on the same model files.
    inputs = np.linspace(-1.5, 2.5, 12, dtype=np.float32)[:, None]
    expected = reference_outputs("elnino", inputs)
    with Client(target) as client, client.create_session("elnino") as session:
        got = np.array([session.step(x) for x in inputs])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    with urllib.request.urlopen(f"http://127.0.0.1:{container['metrics_port']}/metrics", timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    steps = sum(s.value for s in families["lstm_steps"].samples if s.name == "lstm_steps_total")
    assert steps == len(inputs), steps

    # docker stop: SIGTERM to the server (PID 1), which drains and exits 0 well within its grace and docker's timeout.
    session_left_open = Client(target)
    open_session = session_left_open.create_session("elnino")
    open_session.step(inputs[0])
    stop_started = time.monotonic()
    docker.run("stop", "--time", "30", name, timeout=60)
    stopped_in = time.monotonic() - stop_started
    session_left_open.close()
    state = _health(docker, name)
    assert state["ExitCode"] == 0, state
    assert not state["OOMKilled"], state
    assert stopped_in < GRACE + 5, stopped_in
    messages = [json.loads(line).get("message", "") for line in _log_lines(docker, name)]
    assert f"shutting down: {GRACE:.1f} s for in-flight calls" in messages, messages[-10:]
    assert messages[-1] == "stopped", messages[-10:]
    assert not [m for m in messages if "cancelled" in m], messages[-10:]  # drained, nothing cut off at the grace
    report(f"docker stop -> exit 0 in {stopped_in:.1f} s")


def _log_lines(docker: Engine, name: str) -> list[str]:
    result = docker.run("logs", name)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("{")]


def test_the_dockerfile_keeps_the_official_python_image_as_its_default_base() -> None:
    """The Dockerfile keeps its PYTHON_IMAGE argument with the official image as the default: the tests build on a
    Debian-made base only by passing the argument."""
    text = (Path(REPO) / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in text
    assert text.count("FROM ${PYTHON_IMAGE}") == 2
