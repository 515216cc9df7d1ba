"""Per-model micro-batcher: steps of distinct sessions that arrive together are computed as one batched step.

No timer when idle: the worker takes whatever is queued the moment it wakes, so a lone request is computed at once.
Batches form naturally while a computation is under way (requests queue behind it); `max_wait` adds a short pause
only when the queue already held more than one request, i.e. when the server is busy anyway.

Ordering: the batcher never holds two steps of one session, because the data plane keeps each session's steps in
sequence (one in flight per session). Compute runs in `executor` (a thread; NumPy's BLAS and ORT release the GIL) or,
with no executor, inline on the event loop, which is cheaper for small models than a thread hop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from lstm_serve.engine.cell import F32
from lstm_serve.engine.model import Model
from lstm_serve.errors import ShuttingDown

StepResult = tuple[F32, F32]  # outputs (T, O), new state (2, L, H)


@dataclass(slots=True)
class _Pending:
    x: F32
    state: F32
    future: asyncio.Future[StepResult]


class Batcher:
    def __init__(
        self,
        model: Model,
        *,
        max_batch: int = 64,
        max_wait: float = 0.0,
        executor: Executor | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._executor = executor
        self._on_batch = on_batch
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, x: F32, state: F32) -> StepResult:
        """x (T, I) already validated; state (2, L, H) is read, never written."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model.info.name}")
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(x, state, future))
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(ShuttingDown("the server is shutting down"))
        self._queue.clear()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                if self.max_wait > 0 and 1 < len(self._queue) < self.max_batch:
                    await asyncio.sleep(self.max_wait)
                batch = [p for p in self._queue[: self.max_batch] if not p.future.done()]
                del self._queue[: self.max_batch]
                if batch:
                    await self._compute(batch)

    async def _compute(self, batch: list[_Pending]) -> None:
        xs = [p.x for p in batch]
        states = [p.state for p in batch]
        try:
            if self._executor is None:
                results = self.model.run_batch(xs, states)
            else:
                loop = asyncio.get_running_loop()
                results = await loop.run_in_executor(self._executor, self.model.run_batch, xs, states)
        except Exception as exc:  # a backend failure fails this batch only; the sessions keep their old state
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        if self._on_batch is not None:
            self._on_batch(len(batch))
        for p, result in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)
