"""Per-model compute: a batch of distinct sessions' steps as one backend call, on the event loop or in a thread.

The batches come formed: the step path (stepping.py) gathers the steps of a loop turn, or of a many-session
message, and hands them over at once (`submit_many`). Two ways to compute, chosen by whether an executor is given:

- inline (no executor, the default; best for small models, where a thread hop costs more than the step): at once,
  on the loop, in chunks of at most `max_batch`.
- threaded (an executor; for big models, whose compute should not stall the loop): a worker task takes whatever is
  queued when it wakes and computes it in the executor; steps arriving meanwhile form the next batch.
- both (an executor and `inline_max_steps`): a small model computes short requests inline, and requests of more time
  steps than that in the executor, so that a 4096-step request cannot hold the loop (and every other client's step,
  and the health check) for its whole computation.

A step whose caller went away is computed and its result dropped. BLAS and ORT release the GIL, so threaded compute
overlaps the event loop.
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


@dataclass(slots=True)
class _Pending:
    x: F32
    state: F32
    future: asyncio.Future[StepResult] | None  # None when computed inline, its result handed back directly


class Batcher:
    def __init__(
        self,
        model: Model,
        *,
        max_batch: int = 64,
        executor: Executor | None = None,
        inline_max_steps: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        self._executor = executor
        self._inline_max_steps = inline_max_steps
        self._on_batch = on_batch
        self._queue: list[_Pending] = []  # threaded: waiting for the worker
        self._computing: list[_Pending] = []  # threaded: the batch in the executor now
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    def _inline(self, steps: int) -> bool:
        return self._executor is None or (self._inline_max_steps is not None and steps <= self._inline_max_steps)

    async def submit(self, x: F32, state: F32) -> StepResult:
        """x (T, I) already validated; state (2, L, H) is read, never written."""
        [result] = await self.submit_many([x], [state])
        return result

    async def submit_many(self, xs: list[F32], states: list[F32]) -> list[StepResult]:
        """Steps of distinct sessions, computed together: the short ones at once (inline), the others by the worker;
        results in order."""
        results: list[StepResult | None] = [None] * len(xs)
        inline = [i for i, x in enumerate(xs) if self._inline(len(x))]
        for start in range(0, len(inline), self.max_batch):
            chunk = inline[start : start + self.max_batch]
            for i, result in zip(
                chunk, self._compute_inline([_Pending(xs[i], states[i], None) for i in chunk]), strict=True
            ):
                results[i] = result
        if len(inline) < len(xs):
            threaded = [i for i, result in enumerate(results) if result is None]
            loop = asyncio.get_running_loop()
            if self._worker is None or self._worker.done():  # (re)start: a dead worker must not hang the model
                self._worker = loop.create_task(self._run(), name=f"batcher-{self.model.info.name}")
            futures: list[asyncio.Future[StepResult]] = []
            for i in threaded:
                futures.append(loop.create_future())
                self._queue.append(_Pending(xs[i], states[i], futures[-1]))
            self._wakeup.set()
            for i, result in zip(threaded, await asyncio.gather(*futures), strict=True):
                results[i] = result
        return [result for result in results if result is not None]

    def _compute_inline(self, batch: list[_Pending]) -> list[StepResult]:
        try:
            results = self.model.run_batch_checked([p.x for p in batch], [p.state for p in batch])
        except Exception as exc:  # a backend failure fails this batch only; the sessions keep their old state
            self._fail(batch, exc)
            raise
        self._record(batch, results)
        return results

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
