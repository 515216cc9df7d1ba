"""Sessions that outlive the process: real redis-server, several lstm-serve processes (replicas and workers) and the
real client. Every output is compared with PyTorch's for the demo models (tests/fixtures/*_reference.npz), so a step
lost, doubled or computed from the wrong state shows up as a wrong number.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lstm_client import Client, NotFound, RetryPolicy, Session, SessionGone, Unavailable
from tests.procs import LstmServeProcess, RedisServer, running

ELNINO = np.load(Path(__file__).resolve().parents[1] / "fixtures" / "elnino_reference.npz")
MACRO = np.load(Path(__file__).resolve().parents[1] / "fixtures" / "macro_reference.npz")
QUICK = RetryPolicy(initial_backoff=0.02, max_backoff=0.2, budget=15.0)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis"), appendonly="always") as server:
        yield server


@pytest.fixture(scope="module")
def pair(
    redis: RedisServer, cluster_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LstmServeProcess, LstmServeProcess]]:
    logs = tmp_path_factory.mktemp("pair")
    store = ("--store", redis.url, "--store-prefix", "pair:")
    a = LstmServeProcess(cluster_models, *store, log_dir=logs, name="replica-a")
    b = LstmServeProcess(cluster_models, *store, log_dir=logs, name="replica-b")
    with running(a, b):
        yield a, b


def _close(actual: list[float] | np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(actual, np.float32), expected, atol=1e-4, rtol=0)


def test_sessions_stepped_alternately_through_two_replicas_equal_one_process(
    pair: tuple[LstmServeProcess, LstmServeProcess],
) -> None:
    a, b = pair
    with Client(a.target, retry=QUICK) as on_a, Client(b.target, retry=QUICK) as on_b:
        sessions = [on_a.create_session("elnino") for _ in range(3)]
        got: list[list[float]] = [[] for _ in sessions]
        for t, x in enumerate(ELNINO["inputs"]):
            client = on_a if t % 2 == 0 else on_b
            for i, s in enumerate(sessions):
                got[i].append(client.session(s.id).step([x])[0])  # attach by id: the seq comes from the store
        for outputs in got:
            _close(outputs, ELNINO["outputs"])
        # the macro model (ONNX Runtime backend), over streams that hop replica every 8 steps
        session = on_b.create_session("macro")
        streamed: list[np.ndarray] = []
        for start in range(0, len(MACRO["inputs"]), 8):
            client = on_a if (start // 8) % 2 == 0 else on_b
            streamed += client.session(session.id).stream(MACRO["inputs"][start : start + 8])
        _close(np.stack(streamed), MACRO["outputs"])
        info = on_a.session_info(session.id)
        assert (info.seq, info.steps) == (len(MACRO["inputs"]), len(MACRO["inputs"]))


def test_the_same_step_sent_to_two_replicas_at_once_is_applied_once(
    pair: tuple[LstmServeProcess, LstmServeProcess],
) -> None:
    """Both replicas race to commit seq t; the loser finds it applied and replays the stored reply: the two answers
    are identical and the session advanced once."""
    a, b = pair
    with Client(a.target, retry=QUICK) as on_a, Client(b.target, retry=QUICK) as on_b:
        sid = on_a.create_session("elnino").id
        answers: dict[str, list[float]] = {"a": [], "b": []}
        for t, x in enumerate(ELNINO["inputs"]):
            gate = threading.Barrier(2, timeout=10)

            def send(
                name: str, client: Client, seq: int = t + 1, value: float = float(x), gate: threading.Barrier = gate
            ) -> None:
                session = _at(client, sid, seq - 1)
                gate.wait()
                answers[name].append(session.step([value])[0])

            threads = [threading.Thread(target=send, args=("a", on_a)), threading.Thread(target=send, args=("b", on_b))]
            for th in threads:
                th.start()
            for th in threads:
                th.join(15)
        assert answers["a"] == answers["b"]
        _close(answers["a"], ELNINO["outputs"])
        info = on_b.session_info(sid)
        assert (info.seq, info.steps) == (len(ELNINO["inputs"]), len(ELNINO["inputs"]))


def _at(client: Client, session_id: str, seq: int) -> Session:
    """A client-side Session positioned after `seq`, without asking the server (so both racers send the same seq)."""
    session = client.session(session_id)
    session.seq = seq
    return session


def test_every_replica_restarted_sessions_go_on(redis: RedisServer, cluster_models: Path, tmp_path: Path) -> None:
    store = ("--store", redis.url, "--store-prefix", "restart:")
    a = LstmServeProcess(cluster_models, *store, log_dir=tmp_path, name="restart-a")
    b = LstmServeProcess(cluster_models, *store, log_dir=tmp_path, name="restart-b")
    half = len(ELNINO["inputs"]) // 2
    with running(a, b):
        with Client(a.target, retry=QUICK) as client:
            sessions = [client.create_session("elnino", session_id=f"dev-{i}") for i in range(4)]
            first = [[s.step([x])[0] for x in ELNINO["inputs"][:half]] for s in sessions]
        a.kill9()  # a crash
        b.terminate()  # a deploy
        a.restart()
        b.restart()
        with Client(b.target, retry=QUICK) as client:
            for i, done in enumerate(first):
                session = client.session(f"dev-{i}")
                assert session.seq == half
                rest = [session.step([x])[0] for x in ELNINO["inputs"][half:]]
                _close(done + rest, ELNINO["outputs"])


def test_redis_restart_with_aof_always_loses_no_step(redis: RedisServer, cluster_models: Path, tmp_path: Path) -> None:
    server = LstmServeProcess(cluster_models, "--store", redis.url, "--store-prefix", "aof:", log_dir=tmp_path)
    with server, Client(server.target, retry=QUICK) as client:
        session = client.create_session("elnino")
        got = [session.step([x])[0] for x in ELNINO["inputs"][:10]]
        redis.restart()  # SIGKILL: with appendfsync always every acknowledged write is on disk
        got += [session.step([x])[0] for x in ELNINO["inputs"][10:]]
        _close(got, ELNINO["outputs"])


def test_redis_without_persistence_restarted_sessions_are_unknown(cluster_models: Path, tmp_path: Path) -> None:
    """The documented outcome of a store that keeps nothing on disk: sessions are gone, NOT_FOUND unknown_session."""
    with (
        RedisServer(tmp_path / "volatile") as volatile,
        LstmServeProcess(cluster_models, "--store", volatile.url, log_dir=tmp_path) as server,
        Client(server.target, retry=QUICK) as client,
    ):
        session = client.create_session("elnino")
        session.step([25.0])
        volatile.restart()
        with pytest.raises(NotFound) as err:
            session.step([25.5])
        assert err.value.reason == "unknown_session"


def test_redis_outage_makes_replicas_unready_not_dead_and_they_recover(cluster_models: Path, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "flaky", appendonly="always")
    server = LstmServeProcess(cluster_models, "--store", redis.url, "--store-timeout", "0.5", log_dir=tmp_path)
    with redis, server, Client(server.target, retry=RetryPolicy(budget=1.0, initial_backoff=0.05)) as client:
        session = client.create_session("elnino")
        session.step([25.0])
        redis.kill9()
        assert _eventually(lambda: server.health() == "NOT_SERVING"), server.health()
        assert server.health("") == "SERVING"  # liveness: an orchestrator must not restart it
        with pytest.raises(Unavailable):
            session.step([25.5])
        redis.start().wait_ready()
        assert _eventually(lambda: server.health() == "SERVING")
        assert session.step([25.5]).shape == (1,)  # the same seq again: it was never applied
        assert session.info().seq == 2
        assert "readiness NOT_SERVING" in server.log_text()


def _eventually(check: object, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_workers_share_one_port_and_every_session(redis: RedisServer, cluster_models: Path, tmp_path: Path) -> None:
    server = LstmServeProcess(
        cluster_models, "--store", redis.url, "--store-prefix", "workers:", "--workers", "2", log_dir=tmp_path
    )
    with server:
        ids = []
        with Client(server.target, retry=QUICK) as client:
            ids = [client.create_session("elnino").id for _ in range(4)]
        outputs: dict[str, list[float]] = {sid: [] for sid in ids}
        for x in ELNINO["inputs"]:
            with Client(server.target, retry=QUICK) as client:  # a new connection: either worker may take it
                for sid in ids:
                    outputs[sid].append(client.session(sid).step([x])[0])
        for got in outputs.values():
            _close(got, ELNINO["outputs"])
        text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
        steps = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("lstm_steps_total{"))
        assert steps == len(ids) * len(ELNINO["inputs"])  # merged over both workers
        assert 'workers="2"' in text
        assert server.log_text().count("serving 4 model(s)") + server.log_text().count("serving 5 model(s)") >= 2


def test_a_second_memory_store_server_on_a_taken_port_fails_at_once(cluster_models: Path, tmp_path: Path) -> None:
    with LstmServeProcess(cluster_models, log_dir=tmp_path) as first:
        argv = [sys.executable, "-m", "lstm_serve.cli", "serve", "--port", str(first.port), "--metrics-port", "-1"]
        second = subprocess.run([*argv, "--model-dir", str(cluster_models)], capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        last = second.stderr.strip().splitlines()[-1]
        assert (
            last == f"lstm-serve: cannot listen on 127.0.0.1:{first.port}: the address is in use or not available here"
        )
        assert "Traceback" not in second.stderr
        assert "WARNING" not in second.stderr
        assert "Event loop is closed" not in second.stderr
        with Client(first.target) as client:
            assert client.list_models()  # the first is untouched


def test_workers_need_a_shared_store(cluster_models: Path) -> None:
    argv = [sys.executable, "-m", "lstm_serve.cli", "serve", "--workers", "2", "--model-dir", str(cluster_models)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "workers > 1 needs a shared store" in result.stderr


def test_a_session_ended_elsewhere_is_gone_here(pair: tuple[LstmServeProcess, LstmServeProcess]) -> None:
    a, b = pair
    with Client(a.target, retry=QUICK) as on_a, Client(b.target, retry=QUICK) as on_b:
        session = on_a.create_session("elnino")
        session.step([25.0])  # now in replica A's cache
        on_b.session(session.id).close()
        with pytest.raises(SessionGone) as err:
            session.step([25.5])
        assert err.value.reason == "closed"
