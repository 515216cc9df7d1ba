"""Model versions over a shared store (a real redis-server): sessions pinned in Redis, a retired version's sessions
ending when next used after the drain deadline (Redis does not count them per version), and several worker
processes that each pick up a new version through their own file watch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_client import Client, SessionGone
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from tests.integration.test_model_lifecycle import ATOL, Reference, admin, serving, versions, wait_for, write_version
from tests.procs import LstmServeProcess, RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def test_pinned_sessions_in_redis_drain_then_end_when_next_used(tmp_path: Path, redis_server: RedisServer) -> None:
    models = tmp_path / "models"
    v1 = write_version(models / "m", 1, 1.0)
    x = np.full(4, 0.25, np.float32)
    settings = {"store": redis_server.url, "store_prefix": "drain:", "admin_loopback": True}
    with serving(models, version_drain_timeout=1.0, **settings) as server, server.client() as client:
        session = client.create_session("m")
        ref = Reference(v1)
        np.testing.assert_allclose(session.step(x), ref.step(x), atol=ATOL)
        assert redis_server.client().hget(f"drain:s:{session.id}", "v") == b"1"
        v2 = write_version(models / "m", 2, 0.5)
        admin(server, "ReloadModels")
        assert versions(client) == {1: ("unloading", False), 2: ("ready", True)}
        np.testing.assert_allclose(session.step(x), ref.step(x), atol=ATOL)  # before the deadline: still served
        wait_for(lambda: 1 not in versions(client), "the drain deadline")
        with pytest.raises(SessionGone) as gone:
            session.step(x)
        assert gone.value.reason == "model_retired"
        fresh = client.create_session("m")
        np.testing.assert_allclose(fresh.step(x), Reference(v2).step(x), atol=ATOL)


def test_every_worker_picks_up_a_new_version_through_its_file_watch(tmp_path: Path, redis_server: RedisServer) -> None:
    models = tmp_path / "models"
    v1 = write_version(models / "m", 1, 1.0)
    args = ("--workers", "2", "--store", redis_server.url, "--store-prefix", "workers:", "--model-poll-interval", "0.2")
    with LstmServeProcess(models, *args, log_dir=tmp_path) as server:
        x = np.full(4, -0.4, np.float32)
        ref = Reference(v1)
        pinned_id = ""
        with Client(server.target) as client:
            pinned = client.create_session("m")
            pinned_id = pinned.id
            np.testing.assert_allclose(pinned.step(x), ref.step(x), atol=ATOL)
        v2 = write_version(models / "m", 2, 0.5)
        # fresh connections land on either worker (SO_REUSEPORT): every one must serve version 2 as latest
        deadline = time.monotonic() + 20
        agreed = 0
        while agreed < 8:
            assert time.monotonic() < deadline, "the workers did not all load version 2"
            options = [("grpc.use_local_subchannel_pool", 1)]
            with Client(server.target, options=options) as client:
                agreed = agreed + 1 if versions(client).get(2) == ("ready", True) else 0
            time.sleep(0.05)
        for _ in range(6):  # the pinned session goes on with version 1 whichever worker answers
            options = [("grpc.use_local_subchannel_pool", 1)]
            with Client(server.target, options=options) as client:
                session = client.session(pinned_id)
                assert session.info().model_version == 1
                np.testing.assert_allclose(session.step(x), ref.step(x), atol=ATOL)
        for _ in range(50):  # a new session, on a connection whose worker serves version 2 as latest (either one)
            with Client(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as client:
                if versions(client).get(2) != ("ready", True):
                    continue
                fresh = client.create_session("m")
                assert fresh.info().model_version == 2
                np.testing.assert_allclose(fresh.step(x), Reference(v2).step(x), atol=ATOL)
                break
        else:
            raise AssertionError("no connection found a worker serving version 2")
        with grpc.insecure_channel(server.target) as channel:
            stub = lstm_pb2_grpc.ModelAdminServiceStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as refused:  # no admin credentials on this server
                stub.ReloadModels(lstm_pb2.ReloadModelsRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_an_unloaded_model_ends_its_redis_sessions_after_the_drain(tmp_path: Path, redis_server: RedisServer) -> None:
    models = tmp_path / "models"
    write_version(models / "m", 1, 1.0)
    settings = {"store": redis_server.url, "store_prefix": "unload:", "admin_loopback": True}
    with serving(models, version_drain_timeout=0.5, **settings) as server, server.client() as client:
        session = client.create_session("m")
        session.step(np.zeros(4, np.float32))
        admin(server, "UnloadModel", name="m")
        wait_for(lambda: versions(client) == {}, "the drain deadline")
        with pytest.raises(SessionGone) as gone:
            session.step(np.zeros(4, np.float32))
        assert gone.value.reason == "model_retired"
