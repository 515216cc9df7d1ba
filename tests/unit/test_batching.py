"""The batcher computes the steps handed over together as one backend call (long ones in the executor), never waits
idle; the keyed lock keeps per-session order."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

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


async def test_steps_handed_over_together_are_one_batch_and_each_gets_its_own_result() -> None:
    model = _model()
    sizes: list[int] = []
    batcher = Batcher(model, max_batch=64, on_batch=sizes.append)
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(1 + i % 3, 4)).astype(np.float32) for i in range(20)]
    states = [rng.normal(size=model.info.state_shape).astype(np.float32) for _ in xs]
    results = await batcher.submit_many(xs, states)
    await batcher.close()
    assert sizes == [20]
    for x, s, (ys, new_state, finite) in zip(xs, states, results, strict=True):
        [(ys_alone, state_alone)] = model.run_batch([x], [s])
        np.testing.assert_allclose(ys, ys_alone, atol=1e-6)
        np.testing.assert_allclose(new_state, state_alone, atol=1e-6)
        assert finite


async def test_max_batch_splits_large_bursts() -> None:
    sizes: list[int] = []
    model = _model()
    batcher = Batcher(model, max_batch=8, on_batch=sizes.append)
    x = np.zeros((1, 4), np.float32)
    await batcher.submit_many([x] * 20, [model.zero_state()] * 20)
    await batcher.close()
    assert sizes == [8, 8, 4]


async def test_long_requests_go_to_the_executor_short_ones_stay_inline() -> None:
    model = _model()
    sizes: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(model, executor=pool, inline_max_steps=2, on_batch=sizes.append)
        xs = [np.zeros((1, 4), np.float32), np.ones((5, 4), np.float32), np.zeros((2, 4), np.float32)]
        results = await batcher.submit_many(xs, [model.zero_state()] * 3)
        await batcher.close()
    assert sorted(sizes) == [1, 2]  # the two short ones together on the loop, the long one in the executor
    assert [len(ys) for ys, _, _ in results] == [1, 5, 2]  # in the caller's order


@pytest.mark.parametrize("threaded", [False, True])
async def test_a_lone_request_does_not_wait_for_company(threaded: bool) -> None:
    model = _model()
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(model, max_batch=64, executor=pool if threaded else None)
        for _ in range(3):  # an idle batcher computes at once, inline or woken in its worker
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
