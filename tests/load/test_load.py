"""A short, bounded load run in CI: many concurrent sessions, zero errors, and every reply right for its session.

The reference is the NumPy engine run directly on each session's recorded inputs, one session at a time: independent
of the server's request path, batching, streams and session store.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lstm_client.loadtest import LoadConfig, run_load
from lstm_serve.engine.repository import load_model
from tests.servers import RunningServer, model_repository, start_server, stop_server, test_settings

MODEL = "golden_l2_wide"


@pytest.fixture(scope="module", params=["inline", "threaded"])
def load_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The same model computed on the event loop, and in a compute thread (inline_max_parameters=0)."""
    root = model_repository(tmp_path_factory.mktemp(f"models-{request.param}"))
    overrides = {"inline_max_parameters": 0, "compute_threads": 1} if request.param == "threaded" else {}
    server, handle = start_server(test_settings(root, **overrides))
    yield server
    stop_server(server, handle)


def _reference(server: RunningServer, xs: np.ndarray) -> np.ndarray:
    model = load_model(Path(server.app.settings.model_dir) / MODEL)
    [(ys, _)] = model.run_batch([xs], [model.zero_state()])
    return ys


@pytest.mark.parametrize(
    ("mode", "sessions_per_stream", "steps_per_message"),
    [("stream", 8, 1), ("stream", 1, 3), ("unary", 1, 1), ("unary", 1, 4)],
)
def test_concurrent_sessions_each_get_their_own_answers(
    load_server: RunningServer, mode: str, sessions_per_stream: int, steps_per_message: int
) -> None:
    config = LoadConfig(
        target=load_server.target,
        model=MODEL,
        sessions=48,
        steps=24,
        steps_per_message=steps_per_message,
        mode=mode,  # type: ignore[arg-type]
        sessions_per_stream=sessions_per_stream,
        duration=30.0,
        record=True,
        seed=len(mode) * 100 + sessions_per_stream * 10 + steps_per_message,
    )
    result = asyncio.run(run_load(config))
    assert dict(result.errors) == {}
    assert result.steps == 48 * 24
    assert result.mismatched == 0
    assert result.verified == 48  # the server's own Predict agrees as well
    for record in result.sessions:
        xs = np.concatenate([x.reshape(-1, 6) for x in record.inputs])
        ys = np.concatenate([y.reshape(-1, 3) for y in record.outputs])
        np.testing.assert_allclose(ys, _reference(load_server, xs), atol=1e-5, rtol=0)


def test_loadtest_command_line(load_server: RunningServer) -> None:
    argv = [sys.executable, "-m", "lstm_client.loadtest.cli", load_server.target, "--model", MODEL]
    argv += ["--sessions", "8", "--steps", "10", "--sessions-per-stream", "4", "--verify", "--json"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["result"]["steps"] == 80
    assert report["result"]["errors"] == {}
    assert report["result"]["retries"] == 0
    assert report["result"]["verified_sessions"] == 8
    assert report["result"]["latency_ms"]["p50"] > 0

    table = subprocess.run([*argv[:-1], "--quiet"], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "steps" in table.stdout
    assert "errors        none" in table.stdout
    assert "retries" in table.stdout


def test_loadtest_reports_an_unreachable_target() -> None:
    argv = [sys.executable, "-m", "lstm_client.loadtest.cli", "127.0.0.1:1", "--model", MODEL, "--timeout", "2"]
    argv += ["--retry-budget", "0.5"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Unavailable" in result.stderr


def test_locustfile_runs_headless(load_server: RunningServer, tmp_path: Path) -> None:
    locustfile = Path(__file__).with_name("locustfile.py")
    argv = [sys.executable, "-m", "locust", "-f", str(locustfile), "--host", load_server.target, "--headless"]
    argv += ["-u", "4", "-r", "4", "-t", "3s", "--stop-timeout", "5", "--csv", str(tmp_path / "run"), "--only-summary"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "LSTM_MODEL": MODEL})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["Name"]: row for row in csv.DictReader((tmp_path / "run_stats.csv").open())}
    assert int(rows["Step"]["Request Count"]) > 10
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["CreateSession"]["Request Count"]) == 4
