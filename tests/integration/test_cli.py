"""The `lstm-serve` command as a user runs it: serve in a subprocess, health, SIGTERM, inspect."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_client import Client, SequenceError
from tests.golden import REPO

LSTM_SERVE = [sys.executable, "-m", "lstm_serve.cli"]


def _wait_for_port(proc: subprocess.Popen[str], log: list[str]) -> int:
    deadline = time.monotonic() + 30
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"server exited early: {''.join(log)}")
        log.append(line)
        if m := re.search(r"serving \d+ model\(s\) .* on 127\.0\.0\.1:(\d+),", line):
            return int(m.group(1))
    raise AssertionError(f"no 'serving' line in 30 s: {''.join(log)}")


def test_serve_health_and_graceful_sigterm(tmp_path: Path) -> None:
    env = os.environ | {"LSTM_SERVE_MODEL_DIR": str(REPO / "models"), "LSTM_SERVE_LOG_JSON": "false"}
    proc = subprocess.Popen(
        [*LSTM_SERVE, "serve", "--port", "0", "--metrics-port", "-1", "--models", "elnino"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    log: list[str] = []
    try:
        port = _wait_for_port(proc, log)
        assert f"on 127.0.0.1:{port}, metrics off;" in log[-1]  # --metrics-port -1 (was "metrics on ...:0")
        health = subprocess.run(
            [*LSTM_SERVE, "health", "--target", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30
        )
        assert health.returncode == 0, health.stderr
        assert "SERVING" in health.stdout
        # Without --target: the address serve reads from the environment (what the image's HEALTHCHECK relies on)
        probe_env = os.environ | {"LSTM_SERVE_HOST": "0.0.0.0", "LSTM_SERVE_PORT": str(port)}
        health = subprocess.run([*LSTM_SERVE, "health"], capture_output=True, text=True, timeout=30, env=probe_env)
        assert health.returncode == 0, health.stderr
        assert health.stdout.strip() == f"127.0.0.1:{port}: SERVING"
        with Client(f"127.0.0.1:{port}") as client, client.create_session("elnino") as session:
            y = session.step([26.0])
            assert y.shape == (1,)
            assert 20.0 < float(y[0]) < 32.0  # a sea temperature in degrees C
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read() if proc.stderr else ""
        assert "shutting down" in rest
        assert "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    down = subprocess.run([*LSTM_SERVE, "health", "--target", f"127.0.0.1:{port}", "--timeout", "1"], text=True)
    assert down.returncode == 1


def test_invalid_settings_exit_2_with_the_field_named() -> None:
    result = subprocess.run([*LSTM_SERVE, "serve", "--max-sessions", "0"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "max_sessions" in result.stderr


def test_inspect_prints_the_model_summary() -> None:
    result = subprocess.run(
        [*LSTM_SERVE, "inspect", str(REPO / "models" / "elnino")], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert "layers       2 x LSTM(hidden=32)" in result.stdout
    assert "512 bytes per session" in result.stdout


def test_inspect_reports_a_broken_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, allow_pickle=False, **{"meta.format_version": np.array(1)})
    result = subprocess.run([*LSTM_SERVE, "inspect", str(bad)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "no LSTM layer" in result.stderr


def test_json_logs_carry_session_seq_and_request_id() -> None:
    env = os.environ | {"LSTM_SERVE_LOG_JSON": "true", "LSTM_SERVE_MODEL_DIR": str(REPO / "models")}
    proc = subprocess.Popen(
        [*LSTM_SERVE, "serve", "--port", "0", "--metrics-port", "-1"], stderr=subprocess.PIPE, text=True, env=env
    )
    log: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        port = 0
        while not port and time.monotonic() < deadline:
            line = proc.stderr.readline()
            log.append(line)
            entry = json.loads(line)
            if m := re.search(r"on 127\.0\.0\.1:(\d+),", entry["message"]):
                port = int(m.group(1))
        with Client(f"127.0.0.1:{port}", interceptors=[_RequestId("req-42")]) as client:
            session = client.create_session("elnino")
            session.seq = 6  # out of order on purpose
            with pytest.raises(SequenceError):
                session.step([26.0])
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        entries = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    finally:
        if proc.poll() is None:
            proc.kill()
    refused = [e for e in entries if e.get("method") == "Step"]
    assert len(refused) == 1
    entry = refused[0]
    assert entry["level"] == "INFO"
    assert entry["code"] == "FAILED_PRECONDITION"
    assert (entry["session_id"], entry["seq"], entry["request_id"]) == (session.id, 7, "req-42")
    assert "the next step must carry seq 1" in entry["message"]


class _RequestId(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Adds x-request-id to every call, as a caller's tracing middleware would."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), ("x-request-id", self.request_id)]
        return continuation(details._replace(metadata=metadata), request)


SLOW_LOAD = """
import sys, time
import lstm_serve.engine.repository as repository
real_scan = repository.Repository.scan.__func__
def slow_scan(cls, *args):
    time.sleep(120)  # a model that takes minutes to load
    return real_scan(cls, *args)
repository.Repository.scan = classmethod(slow_scan)
from lstm_serve.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_stops_a_server_that_is_still_loading_its_models(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_LOAD, "serve", "--port", "0", "--metrics-port", "-1", "--model-dir", "models"],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)  # loading now (the handlers are set before loading starts)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    assert "stop requested while starting" in err
