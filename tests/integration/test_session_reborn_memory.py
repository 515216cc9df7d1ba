"""A session that ends (evicted, expired) and is created again under the same id while one of its steps computes:
the step must not be committed into the new session. (It was: the memory store's compare-and-set compared revision
counters, which restart at 0, so the old step replaced the new session wholesale and its client was told "applied".
The store now compares the very record, and the data plane answers the old step NOT_FOUND.)"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from lstm_serve.dataplane import DataPlane
from lstm_serve.engine.repository import Repository
from lstm_serve.errors import SessionNotFound
from lstm_serve.metrics import Metrics
from lstm_serve.sessions import EndReason, MemorySessionStore, Stale, StepWrite
from tests.small_models import model


async def test_store_commit_of_a_step_of_an_ended_incarnation_is_refused() -> None:
    store = MemorySessionStore(max_sessions=10, default_ttl=0)
    old = await store.create("a", bytes(40), "s", None)
    write = StepWrite(old, old.stepped(1, np.ones((2, 1, 5), np.float32), np.ones(5, np.float32), bytes(16), 1.0))
    await store.end("s", EndReason.EVICTED, "x")
    await store.create("b", bytes(64), "s", None)  # a new session, same id, another model
    [result] = await store.commit([write])
    # the store refuses the write and tells the truth (the data plane then answers the old client NOT_FOUND)
    assert isinstance(result, Stale), f"old incarnation's step committed into the new session: {result!r}"
    assert result.current.model == "b"
    assert result.current.seq == 0


async def test_in_flight_step_lands_in_a_recreated_session_through_the_dataplane() -> None:
    repo = Repository(models={"a": model("a", 3, 5, seed=1), "b": model("b", 3, 8, seed=2)}, failures={})
    store = MemorySessionStore(max_sessions=1, default_ttl=0)
    plane = DataPlane(repo, store, Metrics())
    gate = asyncio.Event()
    batcher = plane._batchers[("a", 1)]
    real = batcher.submit_many

    async def slow(
        xs: list[np.ndarray], states: list[np.ndarray]
    ) -> list[tuple[np.ndarray, np.ndarray, bool]]:  # a compute that takes a while
        await gate.wait()
        return await real(xs, states)

    batcher.submit_many = slow  # type: ignore[method-assign]
    await plane.create_session("a", "s", 0)
    step = asyncio.create_task(plane.step("s", 1, np.ones(3, np.float32)))
    await asyncio.sleep(0.01)
    await plane.create_session("b", "other", 0)  # max_sessions=1: evicts "s" (creates take no session lock)
    await plane.create_session("b", "s", 0)  # another client takes the id "s" again, with model b
    gate.set()
    with pytest.raises(SessionNotFound, match="ended while this step was computing"):
        await asyncio.wait_for(step, 5)  # was: "applied", for a session that had been evicted
    now = await plane.get_session("s")
    assert (now.model, now.seq) == ("b", 0), f"the new session 's' was overwritten: {now}"
    assert await store.counts() == {"b": 1}  # max_sessions=1: "s" of model b, and nothing of model a
