"""Session store in Redis: every worker process and replica sees the same sessions, and a restart of any of them
loses nothing.

Each step is one compare-and-set in Redis (a Lua script over the whole batch, so a batch costs one round trip): the
write names the record revision it was computed from, and lands only if the session is still there. Revisions are
random tokens, not counters, so that a Redis that lost its last writes (crash with AOF everysec) can never make an old
cached record look current again. A process-local cache of records saves the read: a step computed from a stale
cache entry loses its compare-and-set, and the script hands back the current record to decide again from.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from lstm_serve.errors import CapacityExceeded, SessionExists, SessionNotFound, StoreUnavailable
from lstm_serve.sessions import redis_scripts
from lstm_serve.sessions.memory import Ended, not_found
from lstm_serve.sessions.store import (
    CapacityPolicy,
    CommitResult,
    EndHook,
    EndReason,
    LoadResult,
    Session,
    Stale,
    StepWrite,
    client_id,
    new_session_id,
    validate_session_key,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
CallHook = Callable[[str, float, int, bool], None]  # (operation, seconds, sessions in it, succeeded)
SWEEP_LIMIT = 1000  # expired sessions settled per script call: bounds how long one call holds Redis
_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, rexc.ReadOnlyError, rexc.TryAgainError)


def _token() -> int:
    return secrets.randbits(62) + 1  # never 0, the revision of no session


class RedisSessionStore:
    shared = True
    authoritative = False

    def __init__(
        self,
        url: str,
        *,
        max_sessions: int,
        default_ttl: float,
        policy: CapacityPolicy = CapacityPolicy.EVICT,
        ended_ttl: float = 3600.0,
        prefix: str = "lstm:",
        timeout: float = 2.0,
        cache_size: int = 100_000,
        cache_bytes: int = 256 << 20,
        max_connections: int = 32,
        on_end: EndHook | None = None,
        on_call: CallHook | None = None,
    ) -> None:
        self.url = url
        self._on_call = on_call
        self.max_sessions = max_sessions
        self.default_ttl = default_ttl
        self.policy = policy
        self.prefix = prefix
        self._ended_ms = int(ended_ttl * 1000)
        self._on_end = on_end
        self._cache: dict[str, Session] = {}
        self._cache_size = cache_size
        self._cache_bytes = cache_bytes  # records hold the last reply too: a few long ones must not fill memory
        self._cached_bytes = 0
        # Short timeouts: a step waiting on a dead Redis is better answered UNAVAILABLE (the client retries) than held.
        # One quick retry on a broken connection covers a pooled connection that a Redis restart closed.
        # A bounded pool that makes callers wait for a free connection (a burst of creates must queue, not fail with
        # "too many connections"); short timeouts: a call waiting on a dead Redis is better answered UNAVAILABLE (the
        # client retries) than held. One quick retry on a broken connection covers a pooled connection that a Redis
        # restart closed.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
            retry_on_error=[rexc.ConnectionError],
            health_check_interval=30,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        scripts = {
            name: self._redis.register_script(getattr(redis_scripts, name))
            for name in ("CREATE", "LOAD", "COMMIT", "RESET", "FINISH", "SWEEP")
        }
        self._scripts = scripts

    def __repr__(self) -> str:
        return f"RedisSessionStore({self.url!r}, prefix={self.prefix!r})"

    async def _run(self, name: str, *args: Any, items: int = 1) -> Any:
        call = self._scripts[name](args=(self.prefix, self._ended_ms, *args))
        return await self._guard(name.lower(), call, items)

    async def _guard(self, op: str, call: Awaitable[T], items: int = 1) -> T:
        start = time.perf_counter()
        ok = False
        try:
            result = await call
            ok = True
            return result
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"session store unavailable ({type(exc).__name__}); retry shortly") from exc
        except rexc.ResponseError as exc:
            if str(exc).startswith(("OOM", "LOADING", "MASTERDOWN", "NOREPLICAS", "MISCONF")):
                raise StoreUnavailable(f"session store refused the write: {str(exc).split(chr(10))[0]}") from exc
            raise
        finally:
            if self._on_call is not None:
                self._on_call(op, time.perf_counter() - start, items, ok)

    def _events(self, events: Sequence[bytes]) -> None:
        if self._on_end is None:
            return
        for i in range(0, len(events) - 1, 2):
            self._on_end(events[i].decode(), EndReason(events[i + 1].decode()))

    def _remember(self, session: Session) -> Session:
        """Caches the record, most recent last, within the count and byte bounds (the oldest go first)."""
        cache = self._cache
        self._forget(session.id)
        while cache and (
            len(cache) >= self._cache_size or self._cached_bytes + len(session.record) > self._cache_bytes
        ):
            self._forget(next(iter(cache)))
        cache[session.id] = session
        self._cached_bytes += len(session.record)
        return session

    def _forget(self, session_id: str) -> None:
        dropped = self._cache.pop(session_id, None)
        if dropped is not None:
            self._cached_bytes -= len(dropped.record)

    def _decode(self, session_id: str, reply: Sequence[Any]) -> LoadResult:
        if reply[0] == 1:
            m, r, q, n, c, u, t, d, *v = reply[1:]
            return Session(
                id=session_id,
                model=m.decode(),
                record=d,
                created=int(c) / 1000,
                last_used=int(u) / 1000,
                idle_ttl=int(t) / 1000,
                seq=int(q),
                steps=int(n),
                rev=int(r),
                version=int(v[0]) if v and v[0] else 1,
            )
        reason, at, detail = (v.decode() if isinstance(v, bytes) else "" for v in reply[1:4])
        ended = Ended(EndReason(reason), int(at) / 1000, detail) if reason else None
        return not_found(session_id, ended)

    # --- the SessionStore protocol ------------------------------------------------------------------------------

    async def create(
        self,
        model: str,
        zero_state: bytes,
        session_id: str | None,
        idle_ttl: float | None,
        *,
        tenant_limit: int = 0,
        version: int = 1,
    ) -> Session:
        if session_id:
            validate_session_key(session_id)
        else:
            session_id = new_session_id()
        ttl = self.default_ttl if idle_ttl is None else idle_ttl
        token = _token()
        args = (session_id, model, zero_state, int(ttl * 1000), self.max_sessions, self.policy.value, token)
        status, events, *rest = await self._run("CREATE", *args, SWEEP_LIMIT, tenant_limit, version)
        self._events(events)
        if status == b"exists":
            raise SessionExists(f"session {client_id(session_id)!r} already exists")
        if status == b"full":
            raise CapacityExceeded(
                f"the store holds max_sessions={self.max_sessions} live sessions; close idle ones or retry later"
            )
        if status == b"tenant_full":
            raise CapacityExceeded(
                f"your tenant holds {int(rest[0])} live sessions, its limit (max_sessions_per_tenant); close idle "
                "ones or retry later"
            )
        now = int(rest[0]) / 1000
        session = Session(session_id, model, zero_state, now, now, int(ttl * 1000) / 1000, rev=token, version=version)
        return self._remember(session)

    async def load(self, session_ids: Sequence[str], *, fresh: bool) -> list[LoadResult]:
        results: dict[str, LoadResult] = {}
        missing: list[str] = []
        for session_id in session_ids:
            cached = None if fresh else self._cache.get(session_id)
            if cached is not None:
                results[session_id] = cached
            elif session_id not in results:
                validate_session_key(session_id)
                missing.append(session_id)
        if missing:
            replies, events = await self._run("LOAD", *missing, items=len(missing))
            self._events(events)
            for session_id, reply in zip(missing, replies, strict=True):
                found = self._decode(session_id, reply)
                if isinstance(found, Session):
                    self._remember(found)
                else:
                    self._forget(session_id)
                results[session_id] = found
        return [results[session_id] for session_id in session_ids]

    def now(self) -> float:
        return time.time()  # a placeholder: the commit script stamps the write with Redis's clock

    async def commit(self, writes: Sequence[StepWrite]) -> list[CommitResult]:
        afters = [replace(w.after, rev=_token()) for w in writes]
        args: list[Any] = []
        for write, after in zip(writes, afters, strict=True):
            args += (after.id, write.base.rev, after.rev, after.seq, after.steps, after.record)
        try:
            replies, events = await self._run("COMMIT", *args, items=len(writes))
        except BaseException:
            for write in writes:  # the write may or may not have landed: read it again next time
                self._forget(write.base.id)
            raise
        self._events(events)
        results: list[CommitResult] = []
        for after, reply in zip(afters, replies, strict=True):
            if reply[0] == 2:
                results.append(self._remember(replace(after, last_used=int(reply[1]) / 1000)))
                continue
            found = self._decode(after.id, reply)
            if isinstance(found, Session):
                results.append(Stale(self._remember(found)))
            else:
                self._forget(after.id)
                results.append(found)
        return results

    async def reset(self, session_id: str, zero_state: bytes) -> Session:
        return self._live_or_raise(session_id, await self._run("RESET", session_id, zero_state, _token()))

    async def close(self, session_id: str) -> Session:
        validate_session_key(session_id)
        reply = await self._run("FINISH", session_id, EndReason.CLOSED.value, "by the client", "")
        try:
            return self._live_or_raise(session_id, reply)
        finally:
            self._forget(session_id)

    async def end(self, session_id: str, reason: EndReason, detail: str, *, model: str = "") -> None:
        _, events = await self._run("FINISH", session_id, reason.value, detail, model)
        self._forget(session_id)
        self._events(events)

    async def pinned(self, model: str, version: int) -> int | None:
        return None  # not counted in Redis: a retired version is kept until its drain deadline

    async def end_version(self, model: str, version: int, reason: EndReason, detail: str) -> int:
        return 0  # found only by a scan of every session: each ends when next used (DataPlane._fitting)

    async def sweep(self) -> int:
        ended = 0
        for _ in range(100):  # bounded: at most 100 x SWEEP_LIMIT per sweep, the rest next time
            due, events = await self._run("SWEEP", SWEEP_LIMIT)
            self._events(events)
            ended += len(events) // 2
            if due < SWEEP_LIMIT:
                break
        return ended

    async def counts(self) -> dict[str, int]:
        raw = await self._guard("counts", self._redis.hgetall(self.prefix + "count"))
        return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}

    async def size_bytes(self) -> int:
        info = await self._guard("info", self._redis.info("memory"))
        return int(info.get("used_memory", 0))

    async def ping(self) -> None:
        await self._guard("ping", self._redis.ping())

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    def _live_or_raise(self, session_id: str, reply: Sequence[Any]) -> Session:
        found_reply, events = reply
        self._events(events)
        found = self._decode(session_id, found_reply)
        if isinstance(found, SessionNotFound):
            self._forget(session_id)
            raise found
        return self._remember(found)
