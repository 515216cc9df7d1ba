"""The step path gathers the steps of one loop turn into one batch, keeps each session's steps in order, and settles
every caller's step on its own."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from lstm_serve.dataplane import DataPlane, Limits
from lstm_serve.engine.model import Model
from lstm_serve.engine.npz import load_npz
from lstm_serve.engine.numpy_backend import NumpyBackend
from lstm_serve.engine.repository import Repository
from lstm_serve.errors import SequenceMismatch
from lstm_serve.metrics import Metrics
from lstm_serve.sessions import MemorySessionStore
from tests.golden import golden


def _plane(**limits: object) -> tuple[DataPlane, list[int], Model]:
    weights = load_npz(golden("golden_l3_head").weights)
    model = Model.from_weights("m", weights, NumpyBackend(weights))
    repository = Repository(models={"m": model}, failures={})
    plane = DataPlane(repository, MemorySessionStore(max_sessions=1000, default_ttl=0), Metrics(), Limits(**limits))  # type: ignore[arg-type]
    sizes: list[int] = []
    plane._batchers[("m", 1)]._on_batch = sizes.append
    return plane, sizes, model


async def test_the_steps_of_one_turn_are_one_batch() -> None:
    plane, sizes, model = _plane()
    ids = [(await plane.create_session("m", None, None)).id for _ in range(20)]
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=4).astype(np.float32) for _ in ids]
    outcomes = await asyncio.gather(*(plane.step(s, 1, x) for s, x in zip(ids, xs, strict=True)))
    assert sizes == [20]
    for x, outcome in zip(xs, outcomes, strict=True):
        [(alone, _)] = model.run_batch([x[None]], [model.zero_state()])
        np.testing.assert_allclose(outcome.outputs, alone[0], atol=1e-6)
    await plane.close()


async def test_steps_of_one_session_in_one_turn_apply_in_order() -> None:
    plane, _, model = _plane()
    session = (await plane.create_session("m", None, None)).id
    xs = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)
    outcomes = await asyncio.gather(*(plane.step(session, t + 1, xs[t]) for t in range(3)))
    [(expected, _)] = model.run_batch([xs], [model.zero_state()])
    np.testing.assert_allclose(np.stack([o.outputs for o in outcomes]), expected, atol=1e-6)
    out_of_order = asyncio.gather(plane.step(session, 5, xs[0]), plane.step(session, 4, xs[0]))
    with pytest.raises(SequenceMismatch):  # 5 arrives first: refused; 4 then applies
        await out_of_order
    assert (await plane.get_session(session)).seq == 4
    await plane.close()


async def test_a_caller_that_goes_away_leaves_the_others_answered() -> None:
    plane, _, _ = _plane()
    ids = [(await plane.create_session("m", None, None)).id for _ in range(3)]
    x = np.zeros(4, np.float32)
    tasks = [asyncio.ensure_future(plane.step(s, 1, x)) for s in ids]
    await asyncio.sleep(0)
    tasks[0].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[0], asyncio.CancelledError)
    assert [o.seq for o in done[1:]] == [1, 1]  # type: ignore[union-attr]
    await plane.close()


async def test_a_long_request_does_not_hold_the_short_ones_of_its_turn() -> None:
    plane, sizes, _ = _plane(inline_max_steps=4)
    short, long = [(await plane.create_session("m", None, None)).id for _ in range(2)]
    await asyncio.gather(
        plane.step(short, 1, np.zeros(4, np.float32)), plane.step(long, 1, np.zeros((9, 4), np.float32))
    )
    assert sorted(sizes) == [1, 1]  # two batches: the long request went alone
    await plane.close()
