"""A failing backend answers INTERNAL (details only in the log) and leaves the session exactly as it was."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import numpy as np
import pytest

from lstm_client import AsyncClient, InvalidArgument, ServerError
from lstm_serve.dataplane import DataPlane
from lstm_serve.engine.cell import F32
from lstm_serve.engine.model import Model
from lstm_serve.engine.npz import load_npz
from lstm_serve.engine.numpy_backend import NumpyBackend
from lstm_serve.engine.repository import Repository
from lstm_serve.metrics import Metrics
from lstm_serve.service import Calls, LstmServicer
from lstm_serve.sessions import MemorySessionStore
from tests.golden import TOLERANCE, golden


class FlakyBackend(NumpyBackend):
    failing = False
    overflowing = False  # what a backend returns when huge inputs overflow its arithmetic (Inf - Inf)

    def step(self, x: F32, h: F32, c: F32) -> tuple[F32, F32, F32]:
        if self.failing:
            raise RuntimeError("simulated backend failure")
        if self.overflowing:
            y, h2, c2 = super().step(x, h, c)
            return y, h2, np.full_like(c2, np.nan)
        return super().step(x, h, c)


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[str, FlakyBackend]]:
    weights = load_npz(golden("golden_l1_nohead").weights)
    backend = FlakyBackend(weights)
    repository = Repository(models={"flaky": Model.from_weights("flaky", weights, backend)}, failures={})
    plane = DataPlane(repository, MemorySessionStore(max_sessions=10, default_ttl=0), Metrics())
    server = grpc.aio.server()
    LstmServicer(plane, Calls(plane.metrics)).register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", backend
    await server.stop(0)


async def test_backend_failure_is_internal_and_changes_nothing(flaky: tuple[str, FlakyBackend]) -> None:
    target, backend = flaky
    x = golden("golden_l1_nohead").inputs[0]
    async with AsyncClient(target) as client:
        expected = (await client.predict("flaky", x[:3])).outputs
        session = await client.create_session("flaky")
        await session.step(x[0])
        backend.failing = True
        with pytest.raises(ServerError) as err:
            await session.step(x[1])
        assert err.value.code == grpc.StatusCode.INTERNAL
        assert err.value.message == "internal error; the server log has the details"
        with pytest.raises(ServerError):
            [y async for y in session.stream([x[1]])]
        backend.failing = False
        assert (await session.info()).seq == 1  # nothing was applied
        assert session.seq == 1  # the client did not advance either
        np.testing.assert_allclose(await session.step(x[1]), expected[1], atol=TOLERANCE)
        np.testing.assert_allclose(await session.step(x[2]), expected[2], atol=TOLERANCE)


async def test_a_step_that_would_leave_a_nan_state_is_refused_and_changes_nothing(
    flaky: tuple[str, FlakyBackend],
) -> None:
    target, backend = flaky
    x = golden("golden_l1_nohead").inputs[0]
    async with AsyncClient(target) as client:
        expected = (await client.predict("flaky", x[:2])).outputs
        session = await client.create_session("flaky")
        await session.step(x[0])
        backend.overflowing = True
        with pytest.raises(InvalidArgument, match="overflows"):
            await session.step(x[1])
        with pytest.raises(InvalidArgument, match="overflows"):
            await client.predict("flaky", x[:2])
        backend.overflowing = False
        assert (await session.info()).seq == 1
        np.testing.assert_allclose(await session.step(x[1]), expected[1], atol=TOLERANCE)


async def test_step_many_fails_each_step_of_a_failing_backend_and_changes_nothing(
    flaky: tuple[str, FlakyBackend],
) -> None:
    target, backend = flaky
    x = golden("golden_l1_nohead").inputs[0]
    async with AsyncClient(target) as client:
        expected = (await client.predict("flaky", x[:2])).outputs
        sessions = [await client.create_session("flaky") for _ in range(3)]
        await client.step_many(dict.fromkeys(sessions, x[0]))
        backend.failing = True
        failed = await client.step_many(dict.fromkeys(sessions, x[1]))
        assert not failed.outputs
        assert {type(e) for e in failed.errors.values()} == {ServerError}
        backend.failing, backend.overflowing = False, True
        overflowed = await client.step_many(dict.fromkeys(sessions, x[1]))
        assert all(isinstance(e, InvalidArgument) and "overflows" in e.message for e in overflowed.errors.values())
        backend.overflowing = False
        assert [(await s.info()).seq for s in sessions] == [1, 1, 1]
        result = await client.step_many(dict.fromkeys(sessions, x[1]))
        for s in sessions:
            np.testing.assert_allclose(result.outputs[s], expected[1], atol=TOLERANCE)
