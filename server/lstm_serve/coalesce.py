"""Turns single calls made in the same turn of the event loop into one batch call.

A batch of steps finishes together (the batcher hands every result out at once), so their commits arrive in one
loop turn; gathered here, they reach the session store as one call, which for Redis is one round trip instead of one
per session. The flush is scheduled with call_soon, so it runs after every task woken in this turn has had its say.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    def __init__(self, call: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]], max_batch: int = 256) -> None:
        self._call = call
        self._max_batch = max_batch
        self._items: list[Item] = []
        self._futures: list[asyncio.Future[Result]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        if not self._items:
            loop.call_soon(self._flush)
        future: asyncio.Future[Result] = loop.create_future()
        self._items.append(item)
        self._futures.append(future)
        if len(self._items) >= self._max_batch:
            self._flush()
        # A caller that is cancelled only stops waiting: its item stays in the batch call (others wait on it too).
        return await future

    def _flush(self) -> None:
        if not self._items:
            return
        items, futures = self._items, self._futures
        self._items, self._futures = [], []
        task = asyncio.get_running_loop().create_task(self._run(items, futures))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, items: list[Item], futures: list[asyncio.Future[Result]]) -> None:
        try:
            results = await self._call(items)
            if len(results) != len(items):
                raise RuntimeError(f"batch call returned {len(results)} results for {len(items)} items")
        except BaseException as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("batch call cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def drain(self) -> None:
        """Waits for the batch calls in flight (at shutdown, so that no commit is cut in half)."""
        self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
