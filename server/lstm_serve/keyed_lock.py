"""FIFO mutual exclusion per key (session id), with no memory kept for keys nobody holds.

Built for the step path: taking a free key costs two dict operations and no await; only a second claimant on a held
key waits, on a future of its own, and is handed the key in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class KeyedLock:
    def __init__(self) -> None:
        self._held: dict[str, deque[asyncio.Future[None]]] = {}  # key -> waiters in arrival order

    async def acquire(self, key: str) -> None:
        waiters = self._held.get(key)
        if waiters is None:
            self._held[key] = deque()
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(key)  # we were handed the key just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):  # release() may have dropped it already
                    waiters.remove(future)
            raise

    def try_acquire(self, key: str) -> bool:
        """Takes the key if nobody holds it (no waiting, no await); returns whether it did."""
        if key in self._held:
            return False
        self._held[key] = deque()
        return True

    def release(self, key: str) -> None:
        waiters = self._held[key]
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)  # ownership passes straight to the next waiter
                return
        del self._held[key]

    def __len__(self) -> int:
        return len(self._held)
