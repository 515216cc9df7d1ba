"""The micro-batcher gathers concurrent steps into one backend call, keeps per-session order, never waits idle."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from lstm_serve import batching
from lstm_serve.batching import Batcher
from lstm_serve.engine.model import Model
from lstm_serve.engine.npz import load_npz
from lstm_serve.engine.numpy_backend import NumpyBackend
from lstm_serve.errors import ShuttingDown
from lstm_serve.keyed_lock import KeyedLock
from tests.golden import golden


def _model() -> Model:
    weights = load_npz(golden("golden_l3_head").weights)
    return Model.from_weights("m", weights, NumpyBackend(weights))


@pytest.fixture
def generous_busy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow CI machine must not turn "arrived right after a batch" into "idle": widen the window for the tests."""
    monkeypatch.setattr(batching, "BUSY_WINDOW", 1.0)


@pytest.mark.usefixtures("generous_busy_window")
async def test_concurrent_steps_share_one_batch_and_each_gets_its_own_result() -> None:
    model = _model()
    sizes: list[int] = []
    batcher = Batcher(model, max_batch=64, on_batch=sizes.append)
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(1 + i % 3, 4)).astype(np.float32) for i in range(20)]
    states = [rng.normal(size=model.info.state_shape).astype(np.float32) for _ in xs]
    results = await asyncio.gather(*(batcher.submit(x, s) for x, s in zip(xs, states, strict=True)))
    await batcher.close()
    assert sizes == [1, 19]  # the first finds the server idle and goes alone; the burst behind it shares a batch
    for x, s, (ys, new_state, _) in zip(xs, states, results, strict=True):
        [(ys_alone, state_alone)] = model.run_batch([x], [s])
        np.testing.assert_allclose(ys, ys_alone, atol=1e-6)
        np.testing.assert_allclose(new_state, state_alone, atol=1e-6)


@pytest.mark.usefixtures("generous_busy_window")
async def test_max_batch_splits_large_bursts() -> None:
    sizes: list[int] = []
    model = _model()
    batcher = Batcher(model, max_batch=8, on_batch=sizes.append)
    x = np.zeros((1, 4), np.float32)
    await asyncio.gather(*(batcher.submit(x, model.zero_state()) for _ in range(20)))
    await batcher.close()
    assert sizes == [1, 8, 8, 3]


@pytest.mark.parametrize("threaded", [False, True])
async def test_a_lone_request_does_not_wait_for_company(threaded: bool) -> None:
    model = _model()
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(model, max_batch=64, max_wait=30.0, executor=pool if threaded else None)
        for _ in range(3):  # far below max_wait each: an idle batcher computes at once
            await asyncio.wait_for(batcher.submit(np.zeros((1, 4), np.float32), model.zero_state()), timeout=10)
            await asyncio.sleep(0.01)
        await batcher.close()


async def test_threaded_batcher_gathers_what_queued_during_a_computation() -> None:
    model = _model()
    sizes: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(model, max_batch=64, executor=pool, on_batch=sizes.append)
        x = np.zeros((1, 4), np.float32)
        await asyncio.gather(*(batcher.submit(x, model.zero_state()) for _ in range(30)))
        await batcher.close()
    assert sum(sizes) == 30
    assert len(sizes) < 30


async def test_keyed_lock_is_fifo_per_key_and_forgets_idle_keys() -> None:
    locks = KeyedLock()
    order: list[str] = []

    async def use(key: str, tag: str) -> None:
        await locks.acquire(key)
        try:
            await asyncio.sleep(0)
            order.append(tag)
        finally:
            locks.release(key)

    await asyncio.gather(use("a", "a1"), use("a", "a2"), use("b", "b1"), use("a", "a3"))
    assert [t for t in order if t.startswith("a")] == ["a1", "a2", "a3"]
    assert len(locks) == 0


async def test_keyed_lock_survives_a_cancelled_waiter() -> None:
    locks = KeyedLock()
    await locks.acquire("k")
    waiter = asyncio.create_task(locks.acquire("k"))
    third = asyncio.create_task(locks.acquire("k"))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.sleep(0)
    locks.release("k")  # goes to the third claimant, not to the cancelled one
    await asyncio.wait_for(third, 1)
    locks.release("k")
    assert len(locks) == 0


@pytest.mark.usefixtures("generous_busy_window")
async def test_followers_are_answered_when_their_leader_is_cancelled() -> None:
    model = _model()
    batcher = Batcher(model, max_batch=64, max_wait=0.05)
    x = np.zeros((1, 4), np.float32)
    await batcher.submit(x, model.zero_state())  # the next request counts as "busy" and leads a gathering batch
    leader = asyncio.create_task(batcher.submit(x, model.zero_state()))
    await asyncio.sleep(0.01)
    followers = [asyncio.create_task(batcher.submit(x, model.zero_state())) for _ in range(3)]
    await asyncio.sleep(0.01)
    leader.cancel()
    results = await asyncio.wait_for(asyncio.gather(*followers), timeout=5)
    assert len(results) == 3
    assert leader.cancelled()


async def test_keyed_lock_waiter_cancelled_in_the_same_turn_as_the_release() -> None:
    locks = KeyedLock()
    await locks.acquire("k")
    waiter = asyncio.create_task(locks.acquire("k"))
    await asyncio.sleep(0)  # the waiter is now queued
    waiter.cancel()
    locks.release("k")  # finds the waiter's future already cancelled and frees the key
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert len(locks) == 0
    await asyncio.wait_for(locks.acquire("k"), 1)  # free for the next claimant
    locks.release("k")


class _SlowBackend(NumpyBackend):
    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        time.sleep(0.3)
        return super().step(x, h, c)


async def test_closing_a_threaded_batcher_answers_the_batch_in_flight() -> None:
    weights = load_npz(golden("golden_l3_head").weights)
    model = Model.from_weights("slow", weights, _SlowBackend(weights))
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(model, executor=pool)
        step = asyncio.create_task(batcher.submit(np.zeros((1, 4), np.float32), model.zero_state()))
        await asyncio.sleep(0.05)  # in the executor now
        await batcher.close()
        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(step, 5)


@pytest.mark.parametrize("threaded", [False, True])
async def test_a_failing_batch_hook_fails_no_step(threaded: bool) -> None:
    def broken_hook(size: int) -> None:
        raise ZeroDivisionError

    model = _model()
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(model, executor=pool if threaded else None, on_batch=broken_hook)
        x = np.zeros((1, 4), np.float32)
        results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(x, model.zero_state()) for _ in range(3))), 5)
        assert len(results) == 3
        await batcher.close()
