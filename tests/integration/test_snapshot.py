"""--snapshot: the memory store's sessions survive a restart (SIGTERM writes them, the next start reads them), and a
file that cannot be trusted is refused whole."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from lstm_client import Client, SessionGone
from lstm_serve.app import StartupError
from lstm_serve.sessions import snapshot as snapshots
from tests.golden import FIXTURES, REPO, write_model_dir
from tests.procs import LstmServeProcess
from tests.servers import start_server, stop_server, test_settings

ELNINO = np.load(FIXTURES / "elnino_reference.npz")


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(REPO / "models" / "elnino", root / "elnino")
    write_model_dir(root, "swap", FIXTURES / "golden_l1_nohead.npz")
    return root


def test_a_sigterm_restart_loses_no_session(models: Path, tmp_path: Path) -> None:
    """The `make run` case: a real process stopped with SIGTERM and started again with the same snapshot path."""
    snapshot = tmp_path / "sessions.snap"
    server = LstmServeProcess(models, "--snapshot", str(snapshot), log_dir=tmp_path)
    half = len(ELNINO["inputs"]) // 2
    with server:
        with Client(server.target) as client:
            session = client.create_session("elnino", session_id="sensor-7", ttl=0)
            first = [session.step([x])[0] for x in ELNINO["inputs"][:half]]
            client.create_session("elnino", session_id="done").close()
        assert server.terminate() == 0
        assert snapshot.is_file()
        server.start().wait_ready()
        with Client(server.target) as client:
            session = client.session("sensor-7")
            assert session.seq == half
            rest = [session.step([x])[0] for x in ELNINO["inputs"][half:]]
            with pytest.raises(SessionGone) as err:
                client.session_info("done")
            assert err.value.reason == "closed"  # why a session ended survives too
        assert "restored 1 session(s)" in server.log_text()
    np.testing.assert_allclose(np.array(first + rest), ELNINO["outputs"], atol=1e-4, rtol=0)


def test_a_crash_loses_at_most_the_snapshot_interval(models: Path, tmp_path: Path) -> None:
    """kill -9 writes nothing: what survives is the last periodic snapshot, and sessions go on from there (a client
    that stepped further is told the seq to resume from)."""
    snapshot = tmp_path / "crash.snap"
    server = LstmServeProcess(models, "--snapshot", str(snapshot), "--snapshot-interval", "0.2", log_dir=tmp_path)
    with server:
        with Client(server.target) as client:
            session = client.create_session("elnino", session_id="crashy", ttl=0)
            first = [session.step([x])[0] for x in ELNINO["inputs"][:10]]
            for _ in range(50):  # bounded: until a periodic write has caught all ten steps
                time.sleep(0.1)
                if snapshot.exists() and {s.id: s.seq for s in snapshots.read(snapshot).sessions}.get("crashy") == 10:
                    break
        server.kill9()
        server.start().wait_ready()
        with Client(server.target) as client:
            session = client.session("crashy")
            assert session.seq == 10
            rest = [session.step([x])[0] for x in ELNINO["inputs"][10:]]
    np.testing.assert_allclose(np.array(first + rest), ELNINO["outputs"], atol=1e-4, rtol=0)


def _run_and_snapshot(models: Path, snapshot: Path) -> None:
    running, handle = start_server(test_settings(models, snapshot=snapshot))
    try:
        with running.client() as client:
            session = client.create_session("swap", session_id="s1")
            session.step(np.ones(3, np.float32))
            client.create_session("elnino", session_id="e1").step([25.0])
    finally:
        stop_server(running, handle)


def test_a_model_that_changed_shape_ends_its_sessions_with_that_reason(models: Path, tmp_path: Path) -> None:
    snapshot = tmp_path / "s.snap"
    _run_and_snapshot(models, snapshot)
    shutil.rmtree(models / "swap")
    write_model_dir(models, "swap", FIXTURES / "golden_l3_head.npz")  # same name, another state shape
    running, handle = start_server(test_settings(models, snapshot=snapshot))
    try:
        with running.client() as client:
            with pytest.raises(SessionGone) as err:
                client.session_info("s1")
            assert err.value.reason == "model_changed"
            assert "changed its state shape" in err.value.message
            assert client.session_info("e1").seq == 1  # other models' sessions are untouched
    finally:
        stop_server(running, handle)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:-40], "checksum mismatch"),
        (lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:], "checksum mismatch"),
        (lambda data: b"not a snapshot at all", "not an lstm-serve snapshot"),
        (lambda data: data[:8] + b"\x09\x00" + data[10:], "format version 9"),
    ],
)
def test_a_corrupt_or_foreign_snapshot_is_refused_whole(
    models: Path, tmp_path: Path, damage: object, message: str
) -> None:
    snapshot = tmp_path / "s.snap"
    _run_and_snapshot(models, snapshot)
    bad = damage(snapshot.read_bytes())  # type: ignore[operator]
    snapshot.write_bytes(bad)
    with pytest.raises(RuntimeError) as err:
        start_server(test_settings(models, snapshot=snapshot))
    cause = err.value.__cause__
    assert isinstance(cause, StartupError)
    assert message in str(cause)
    assert "move it away" in str(cause)
    assert snapshot.read_bytes() == bad  # left as it was, for the operator to look at


def test_snapshot_needs_the_memory_store() -> None:
    with pytest.raises(ValueError, match="snapshot is for the memory store"):
        test_settings(Path("models"), snapshot=Path("x"), store="redis://127.0.0.1:1/0")
