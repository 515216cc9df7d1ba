"""A step that finds, on re-reading the session (a stale cache, a lost compare-and-set), that the id now names a
session of another model: it must be decided with that model, never computed with the one it first read. (It was:
the client got the wrong model's outputs and the new session a record of the wrong shape.)"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from lstm_serve.dataplane import DataPlane
from lstm_serve.engine.repository import Repository
from lstm_serve.errors import SessionNotFound
from lstm_serve.metrics import Metrics
from lstm_serve.sessions.redis_store import RedisSessionStore
from tests.procs import RedisServer
from tests.small_models import model


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def _plane(url: str) -> DataPlane:
    repo = Repository(models={"a": model("a", 3, 5, seed=1), "b": model("b", 3, 8, seed=2)}, failures={})
    store = RedisSessionStore(url, max_sessions=100, default_ttl=60.0, prefix="rv1:")
    return DataPlane(repo, store, Metrics())


async def test_step_after_id_reused_with_another_model_uses_that_model(redis_server: RedisServer) -> None:
    x_plane, y_plane = _plane(redis_server.url), _plane(redis_server.url)  # two workers / replicas
    try:
        x = np.ones(3, np.float32)
        await x_plane.create_session("a", "dev", 0)
        await x_plane.step("dev", 1, x)  # replica X now caches "dev" (model a, seq 1)

        await y_plane.close_session("dev")  # the client closes it and starts over, with model b, through replica Y
        await y_plane.create_session("b", "dev", 0)

        out = (await x_plane.step("dev", 1, x)).outputs  # its first step lands on replica X
        expected, _, _ = await y_plane.predict("b", x.reshape(1, 3), None, None)
        assert out.shape == (8,), f"model b has 8 outputs, the step answered {out.shape} (computed with model a)"
        np.testing.assert_allclose(out, expected[0], atol=1e-5)
    finally:
        await x_plane.store.aclose()
        await y_plane.store.aclose()


async def test_the_reused_session_survives_the_wrongly_computed_step(redis_server: RedisServer) -> None:
    x_plane, y_plane = _plane(redis_server.url), _plane(redis_server.url)
    try:
        x = np.ones(3, np.float32)
        await x_plane.create_session("a", "dev2", 0)
        await x_plane.step("dev2", 1, x)
        await y_plane.close_session("dev2")
        await y_plane.create_session("b", "dev2", 0)
        await x_plane.step("dev2", 1, x)
        try:
            await y_plane.step("dev2", 2, x)
        except SessionNotFound as exc:
            pytest.fail(f"the new session was destroyed by a record of the other model: {exc.message}")
    finally:
        await x_plane.store.aclose()
        await y_plane.store.aclose()
