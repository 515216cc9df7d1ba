"""Per-model micro-batcher: steps of distinct sessions that arrive together are computed as one batched step.

Two ways to run, chosen by whether an executor is given:

- inline (no executor, the default; best for small models, where a thread hop costs more than the step): the first
  request to arrive leads a batch. If the previous batch finished more than BUSY_WINDOW ago (the server is idle) it
  computes at once. Otherwise it yields the event loop for `max_wait` (0: one turn) so that the requests already
  received join its batch, computes the batch on the loop, and hands each follower its result. An inline step
  finishes within one turn of the loop, so "other steps in progress" is never visible; recent activity is the sign
  of load.
- threaded (an executor; for big models, whose compute should not stall the loop): a worker task takes whatever is
  queued when it wakes and computes it in the executor; requests arriving meanwhile form the next batch.
  `max_wait` adds a pause only when the queue already held more than one request, i.e. when busy anyway.
- both (an executor and `inline_max_steps`): a small model computes short requests inline, and requests of more time
  steps than that in the executor, so that a 4096-step request cannot hold the loop (and every other client's step,
  and the health check) for its whole computation.

Ordering: the data plane keeps each session's steps in sequence (one in flight per session), so a batch holds at most
one live step per session; a step whose caller went away is computed and its result dropped. BLAS and ORT release
the GIL, so threaded compute overlaps the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from lstm_serve.engine.cell import F32
from lstm_serve.engine.model import Model, StepResult
from lstm_serve.errors import ShuttingDown

__all__ = ["Batcher", "StepResult"]

# A step arriving sooner than this after the previous batch finished means requests are queueing: gather. Well below
# a network round trip (~0.5 ms on loopback), so a lone client in ping-pong never pays for the gathering turn.
BUSY_WINDOW = 0.0002


@dataclass(slots=True)
class _Pending:
    x: F32
    state: F32
    future: asyncio.Future[StepResult] | None  # None for the inline leader, which gets its result directly


class Batcher:
    def __init__(
        self,
        model: Model,
        *,
        max_batch: int = 64,
        max_wait: float = 0.0,
        executor: Executor | None = None,
        inline_max_steps: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._executor = executor
        self._inline_max_steps = inline_max_steps
        self._on_batch = on_batch
        self._last_batch_end = float("-inf")
        self._forming: list[_Pending] | None = None  # inline: the batch its leader is gathering
        self._queue: list[_Pending] = []  # threaded: waiting for the worker
        self._computing: list[_Pending] = []  # threaded: the batch in the executor now
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    def _inline(self, steps: int) -> bool:
        return self._executor is None or (self._inline_max_steps is not None and steps <= self._inline_max_steps)

    async def submit(self, x: F32, state: F32) -> StepResult:
        """x (T, I) already validated; state (2, L, H) is read, never written."""
        if self._inline(len(x)):
            return await self._submit_inline(x, state)
        return await self._submit_threaded(x, state)

    async def submit_many(self, xs: list[F32], states: list[F32]) -> list[StepResult]:
        """Steps that arrived together already (a message carrying many sessions' steps): computed in batches of at
        most max_batch, at once, without waiting for company."""
        if all(self._inline(len(x)) for x in xs):
            results: list[StepResult] = []
            for start in range(0, len(xs), self.max_batch):
                chunk = [
                    _Pending(x, s, None)
                    for x, s in zip(xs[start : start + self.max_batch], states[start:], strict=False)
                ]
                results += self._compute_inline(chunk)
            return results
        return list(await asyncio.gather(*(self._submit_threaded(x, s) for x, s in zip(xs, states, strict=True))))

    async def _submit_inline(self, x: F32, state: F32) -> StepResult:
        if self._forming is not None and len(self._forming) < self.max_batch:
            future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
            self._forming.append(_Pending(x, state, future))
            return await future
        batch = [_Pending(x, state, None)]
        if asyncio.get_running_loop().time() - self._last_batch_end < BUSY_WINDOW:
            self._forming = batch
            try:
                await asyncio.sleep(self.max_wait)
            except asyncio.CancelledError:  # the leader's caller went away: its followers still get their answers
                self._forming = None
                if len(batch) > 1:
                    with contextlib.suppress(Exception):
                        self._compute_inline(batch[1:])
                raise
            self._forming = None
        return self._compute_inline(batch)[0]

    def _compute_inline(self, batch: list[_Pending]) -> list[StepResult]:
        try:
            results = self.model.run_batch_checked([p.x for p in batch], [p.state for p in batch])
        except Exception as exc:  # a backend failure fails this batch only; the sessions keep their old state
            self._fail(batch, exc)
            raise
        finally:
            self._last_batch_end = asyncio.get_running_loop().time()
        self._record(batch, results)
        return results

    async def _submit_threaded(self, x: F32, state: F32) -> StepResult:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():  # (re)start: a dead worker must not hang the model
            self._worker = loop.create_task(self._run(), name=f"batcher-{self.model.info.name}")
        future: asyncio.Future[StepResult] = loop.create_future()
        self._queue.append(_Pending(x, state, future))
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        unanswered = self._computing + self._queue  # taken before the worker's cancellation clears them
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a dead worker must not abort shutdown
                await self._worker
            self._worker = None
        self._fail(unanswered, ShuttingDown("the server is shutting down"))
        self._queue.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                if self.max_wait > 0 and 1 < len(self._queue) < self.max_batch:
                    await asyncio.sleep(self.max_wait)
                batch = [p for p in self._queue[: self.max_batch] if p.future is not None and not p.future.done()]
                del self._queue[: self.max_batch]
                if not batch:
                    continue
                xs, states = [p.x for p in batch], [p.state for p in batch]
                self._computing = batch
                try:
                    results = await loop.run_in_executor(self._executor, self.model.run_batch_checked, xs, states)
                except Exception as exc:
                    self._fail(batch, exc)
                    continue
                finally:
                    self._computing = []
                self._record(batch, results)

    def _record(self, batch: list[_Pending], results: list[StepResult]) -> None:
        """Hands out the results; never raises, so no caller is left waiting and the worker never dies here."""
        for p, result in zip(batch, results, strict=False):
            if p.future is not None and not p.future.done():
                p.future.set_result(result)
        if len(results) != len(batch):
            self._fail(batch, RuntimeError(f"backend returned {len(results)} results for {len(batch)} steps"))
        if self._on_batch is not None:
            with contextlib.suppress(Exception):  # a metrics hiccup must not fail steps that were computed
                self._on_batch(len(batch))

    @staticmethod
    def _fail(batch: list[_Pending], exc: Exception) -> None:
        for p in batch:
            if p.future is not None and not p.future.done():
                p.future.set_exception(exc)
