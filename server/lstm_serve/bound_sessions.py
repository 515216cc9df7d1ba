"""Sessions bound to a stream (StreamSteps with `lstm-bind-sessions: 1`): closed when the stream ends, for clients
that would otherwise leak sessions.

Kept apart from the data plane's other session methods because it is a small state machine of its own: which live
streams of this process hold each session, and the background closes waiting out their grace.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

from lstm_serve.errors import LstmServeError
from lstm_serve.keyed_lock import KeyedLock
from lstm_serve.sessions import Session, SessionStore, session_key


class StreamBindings:
    def __init__(
        self,
        store: SessionStore,
        locks: KeyedLock,
        load: Callable[..., Awaitable[Session]],
        grace: float,
    ) -> None:
        self._store = store
        self._locks = locks  # the step path's: a close never lands between a step's compute and its commit
        self._load = load  # (key, session_id, fresh=) -> the session, checked against its model
        self._grace = grace
        self._bindings: Counter[str] = Counter()  # session key -> live streams of this process bound to it
        self._releases: set[asyncio.Task[None]] = set()  # closes waiting out their grace

    def bind(self, bound: set[str], session_id: str, tenant: str) -> None:
        """Binds a session to a stream (`bound`: the stream's sessions) once it has stepped on it."""
        if session_id not in bound:
            bound.add(session_id)
            self._bindings[session_key(tenant, session_id)] += 1

    def release(self, session_ids: set[str], tenant: str, ended_by_client: bool) -> None:
        """The stream these sessions were bound to has ended. Ended by the client (it half-closed and had every
        reply): they are closed now, unless another stream of this process is bound to them too. Otherwise
        (cancelled, broken, the server draining): after the grace, each one not stepped meanwhile - a client that
        reconnects resends its unanswered steps at once - is closed. Runs in the background; a session already gone
        is no error."""
        grace = 0.0 if ended_by_client else self._grace
        for session_id in session_ids:
            key = session_key(tenant, session_id)
            self._bindings[key] -= 1
            if self._bindings[key] <= 0:
                del self._bindings[key]
        task = asyncio.get_running_loop().create_task(self._close(sorted(session_ids), tenant, grace))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def cancel(self) -> None:
        """At shutdown: the closes still waiting are dropped (those sessions end by their idle TTL)."""
        for release in list(self._releases):
            release.cancel()

    async def _close(self, session_ids: list[str], tenant: str, grace: float) -> None:
        seen: dict[str, tuple[int, float]] = {}
        if grace > 0:
            for session_id in session_ids:
                try:
                    session = await self._load(session_key(tenant, session_id), session_id, fresh=True)
                except LstmServeError:
                    continue
                seen[session_id] = (session.seq, session.created)
            await asyncio.sleep(grace)
        for session_id in session_ids if grace == 0 else list(seen):
            key = session_key(tenant, session_id)
            await self._locks.acquire(key)
            try:
                if self._bindings[key] > 0:
                    continue  # still bound to another stream of this process: closed when that one ends
                if grace > 0:
                    now = await self._load(key, session_id, fresh=True)
                    if (now.seq, now.created) != seen[session_id]:
                        continue  # stepped again (a reconnect elsewhere) or created anew: the client is back
                await self._store.close(key)
            except LstmServeError:
                continue  # gone already, or the store is unreachable: its idle TTL ends it
            finally:
                self._locks.release(key)
