"""Failover as an operator causes it: `lstm-loadtest --verify` through nginx in front of two replicas sharing Redis,
and one replica killed with SIGKILL in the middle of the run (then started again). The caller must see no error after
its retries, and every session's outputs must equal a fault-free Predict over the same inputs: nothing lost, nothing
applied twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import LstmServeProcess, NginxFactory, RedisServer, running

MODEL = "golden_l2_wide"


@pytest.fixture
def cluster(cluster_models: Path, tmp_path: Path) -> Iterator[tuple[RedisServer, LstmServeProcess, LstmServeProcess]]:
    redis = RedisServer(tmp_path / "redis", appendonly="everysec")
    with redis:
        store = ("--store", redis.url, "--shutdown-grace", "1")
        a = LstmServeProcess(cluster_models, *store, log_dir=tmp_path, name="replica-a")
        b = LstmServeProcess(cluster_models, *store, log_dir=tmp_path, name="replica-b")
        with running(a, b):
            yield redis, a, b


@pytest.mark.parametrize(("mode", "hashed"), [("stream", True), ("unary", False)])
def test_a_replica_killed_mid_run_costs_the_caller_nothing(
    cluster: tuple[RedisServer, LstmServeProcess, LstmServeProcess],
    make_nginx: NginxFactory,
    tmp_path: Path,
    mode: str,
    hashed: bool,
) -> None:
    _, a, b = cluster
    nginx = make_nginx([a.port, b.port], hash_on_session=hashed)
    stderr = tmp_path / f"loadtest-{mode}.log"
    argv = [
        sys.executable, "-m", "lstm_client.loadtest.cli", nginx.target,
        "--model", MODEL, "--mode", mode, "--sessions", "24", "--steps", "300",
        "--duration", "60", "--retry-budget", "20", "--verify", "--json",
    ]  # fmt: skip
    with open(stderr, "w") as err:
        loadtest = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 30
        while _served(a) + _served(b) < 400 and time.monotonic() < deadline and loadtest.poll() is None:  # mid-run
            time.sleep(0.05)
        assert loadtest.poll() is None, "the run ended before the kill: make it longer"
        served_by_a, served_by_b = _served(a), _served(b)
        a.kill9()
        time.sleep(1.0)
        a.restart()
        out, _ = loadtest.communicate(timeout=120)
    finally:
        if loadtest.poll() is None:
            loadtest.kill()
            loadtest.wait(10)
    result = json.loads(out)["result"]
    assert loadtest.returncode == 0, (result, stderr.read_text())
    assert result["errors"] == {}
    assert result["steps"] == 24 * 300
    assert (result["verified_sessions"], result["mismatched_sessions"]) == (24, 0)
    # both replicas served before the kill, and the run went on after it (the calls caught in flight were retried
    # by the client, or moved by nginx to the live replica before they reached the dead one)
    assert served_by_a > 0
    assert served_by_b > 0
    assert _served(a) + _served(b) > served_by_b


def _served(server: LstmServeProcess) -> float:
    """Steps a replica has computed, from its /metrics (0 while it is down)."""
    try:
        text = urllib.request.urlopen(server.metrics_url, timeout=2).read().decode()
    except OSError:
        return 0.0
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("lstm_steps_total{"))
