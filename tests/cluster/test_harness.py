"""tests/procs.py itself: programs start, become ready, restart on the same port, and leave nothing behind."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.procs import LstmServeProcess, ManagedProcess, RedisServer, health_status


def test_redis_starts_and_answers_ping(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as redis:
        assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
        assert redis.ping()
        assert redis.client().ping()
    assert not redis.running
    assert not redis.ping()


def test_redis_restart_keeps_what_the_aof_holds(tmp_path: Path) -> None:
    with RedisServer(tmp_path, appendonly="always") as redis:
        client = redis.client()
        client.set("k", "v")
        pid = redis.pid
        redis.restart()  # SIGKILL: only the AOF, fsynced on every write, survives
        assert redis.pid != pid
        assert client.get("k") == b"v"  # the same URL: same port and directory
        assert (tmp_path / "appendonlydir").is_dir()


def test_redis_without_persistence_forgets_on_restart(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as redis:  # no AOF, --save '': nothing on disk
        redis.client().set("k", "v")
        redis.restart(hard=False)  # even SIGTERM writes nothing
        assert redis.client().get("k") is None


def test_lstm_serve_restarts_on_the_same_port(cluster_models: Path, tmp_path: Path) -> None:
    with LstmServeProcess(cluster_models, log_dir=tmp_path) as server:
        assert server.health() == "SERVING"
        assert server.health("") == "SERVING"
        target, pid = server.target, server.pid
        assert server.kill9() == -signal.SIGKILL
        assert health_status(target) == "UNAVAILABLE"
        server.restart()
        assert (server.target, server.health()) == (target, "SERVING")
        assert server.pid != pid
        assert server.terminate() == 0  # SIGTERM: drains and exits 0
    assert server.log_text().count("--- start #") == 2
    assert "serving 5 model(s)" in server.log_text()


class _Sleeper(ManagedProcess):
    """A parent that leaves a child behind in its process group when it dies."""

    name = "sleeper"

    def argv(self) -> list[str]:
        return ["/bin/sh", "-c", "sleep 60 & exec sleep 60"]

    def probe(self) -> bool:
        return len(self.group_alive()) == 2


def test_stop_leaves_nothing_of_the_group_behind(tmp_path: Path) -> None:
    with _Sleeper(tmp_path) as sleeper:
        child = next(pid for pid in sleeper.group_alive() if pid != sleeper.pid)
        sleeper.terminate()  # SIGTERM kills the parent only; the child is killed as a leftover
        assert child not in sleeper.group_alive()
        assert sleeper.group_alive() == []
