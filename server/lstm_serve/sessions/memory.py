"""In-process session store: a dict in LRU order, idle TTL, a size bound, and a memory of how sessions ended.

The embedded default: nothing to run beside the server. Sessions die with the process unless a snapshot is written
at shutdown (lstm_serve.sessions.snapshot); a port shared with other processes would split sessions between them, so
the server refuses SO_REUSEPORT with this store.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from lstm_serve.errors import CapacityExceeded, SessionExists, SessionNotFound
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
    tenant_of,
    validate_session_key,
)

TENANT_SWEEP_INTERVAL = 0.25  # seconds between full scans for expired sessions forced by a tenant at its limit


@dataclass(frozen=True, slots=True)
class Ended:
    reason: EndReason
    at: float
    detail: str


def not_found(session_id: str, ended: Ended | None) -> SessionNotFound:
    """The one wording of "gone" for every store: why and when, or plain unknown. It names the session by the id
    its client knows (never the tenant prefix of its key)."""
    validate_session_key(session_id)  # a malformed id is bad input, not an unknown session (and is not echoed)
    shown = client_id(session_id)
    if ended is None:
        return SessionNotFound(f"unknown session {shown!r}")
    when = datetime.fromtimestamp(ended.at, UTC).isoformat(timespec="seconds")
    verb = "ended" if ended.reason in (EndReason.MODEL_CHANGED, EndReason.MODEL_RETIRED) else ended.reason.value
    return SessionNotFound(f"session {shown!r} was {verb} {ended.detail} at {when}", ended.reason)


class MemorySessionStore:
    """Not thread-safe: used from the event loop only. Its async methods never suspend.

    Ended sessions are remembered (at most `max_ended`, for `ended_ttl` seconds) so that a client whose session is gone
    learns why instead of a bare "unknown session".
    """

    shared = False
    authoritative = True

    def __init__(
        self,
        *,
        max_sessions: int,
        default_ttl: float,
        policy: CapacityPolicy = CapacityPolicy.EVICT,
        max_bytes: int = 1 << 62,
        ended_ttl: float = 3600.0,
        max_ended: int = 100_000,
        clock: Callable[[], float] = time.time,
        on_end: EndHook | None = None,
    ) -> None:
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.bytes = 0  # the records held (state and the last reply of every session): what --max-session-bytes bounds
        self.default_ttl = default_ttl
        self.policy = policy
        self.ended_ttl = ended_ttl
        self.max_ended = max_ended
        self._clock = clock
        self._on_end = on_end
        # Least recently used first. A plain dict keeps insertion order and costs 38 bytes an entry against
        # OrderedDict's 91 (measured); "move to end" is pop + insert, "oldest" is the first key.
        self._live: dict[str, Session] = {}
        self._ended: OrderedDict[str, Ended] = OrderedDict()  # oldest first
        self._counts: Counter[str] = Counter()
        self._pinned: Counter[tuple[str, int]] = Counter()  # live sessions by (model, version)
        self._tenants: Counter[str] = Counter()  # live sessions by tenant (the key's prefix; "" for plain ids)
        self._tenant_swept = float("-inf")

    def __len__(self) -> int:
        return len(self._live)

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
            existing = self._live.get(session_id)
            if existing is not None and self._idle_expired(existing, self._clock()):
                self._expire(existing)  # expired but not swept yet: the id is free, as get() would report
            elif existing is not None:
                raise SessionExists(f"session {client_id(session_id)!r} already exists")
        else:
            session_id = new_session_id()
        tenant = tenant_of(session_id)
        if tenant_limit > 0 and self._tenants[tenant] >= tenant_limit:
            # expired but unswept sessions give their places back; the full scan is rationed, since one tenant at its
            # limit could otherwise make every create of its own scan every tenant's sessions
            now = self._clock()
            if now - self._tenant_swept >= TENANT_SWEEP_INTERVAL:
                self._tenant_swept = now
                self.sweep_now()
            if self._tenants[tenant] >= tenant_limit:
                raise CapacityExceeded(
                    f"your tenant holds {self._tenants[tenant]} live sessions, its limit "
                    "(max_sessions_per_tenant); close idle ones or retry later"
                )
        if len(self._live) >= self.max_sessions:
            self.sweep_now()
        if len(self._live) >= self.max_sessions and self.policy is CapacityPolicy.REFUSE:
            raise CapacityExceeded(
                f"the server holds max_sessions={self.max_sessions} live sessions; close idle ones or retry later"
            )
        while len(self._live) >= self.max_sessions:
            victim = self._live.pop(next(iter(self._live)))
            self._end(victim, EndReason.EVICTED, f"(least recently used; at max_sessions={self.max_sessions})")
        self._make_room(len(zero_state), keep="")
        now = self._clock()
        session = Session(
            id=session_id,
            model=model,
            record=zero_state,
            created=now,
            last_used=now,
            idle_ttl=self.default_ttl if idle_ttl is None else idle_ttl,
            version=version,
        )
        self._add(session)
        return session

    async def load(self, session_ids: Sequence[str], *, fresh: bool) -> list[LoadResult]:
        results: list[LoadResult] = []
        for session_id in session_ids:
            try:
                results.append(self.get(session_id))
            except SessionNotFound as exc:
                results.append(exc)
        return results

    async def commit(self, writes: Sequence[StepWrite]) -> list[CommitResult]:
        results: list[CommitResult] = []
        for write in writes:
            try:
                live = self.get(write.base.id)
            except SessionNotFound as exc:  # evicted or expired while computing
                results.append(exc)
                continue
            if live is not write.base:  # the very record the step was computed from, not an equal-looking one: a
                results.append(Stale(live))  # session ended and re-created under the id restarts its rev at 0
                continue
            growth = len(write.after.record) - len(live.record)
            if self.bytes + growth > self.max_bytes:
                try:
                    self._make_room(growth, keep=live.id)
                except CapacityExceeded as exc:
                    results.append(exc)
                    continue
            self._replace(write.after)  # stamped with now() by the caller: this store's clock decides idleness
            results.append(write.after)
        return results

    def now(self) -> float:
        return self._clock()

    async def reset(self, session_id: str, zero_state: bytes) -> Session:
        session = self.get(session_id).reset(zero_state, self._clock())
        self._replace(session)
        return session

    async def close(self, session_id: str) -> Session:
        session = self.get(session_id)
        del self._live[session_id]
        self._end(session, EndReason.CLOSED, "by the client")
        return session

    async def end(self, session_id: str, reason: EndReason, detail: str, *, model: str = "") -> None:
        session = self._live.get(session_id)
        if session is not None and (not model or session.model == model):
            del self._live[session_id]
            self._end(session, reason, detail)

    async def pinned(self, model: str, version: int) -> int | None:
        return self._pinned[(model, version)]

    async def end_version(self, model: str, version: int, reason: EndReason, detail: str) -> int:
        if not self._pinned[(model, version)]:
            return 0
        victims = [s for s in self._live.values() if s.model == model and s.version == version]
        for session in victims:
            del self._live[session.id]
            self._end(session, reason, detail)
        return len(victims)

    async def sweep(self) -> int:
        ended = 0
        for count in self.sweep_in_chunks():
            ended += count
            await asyncio.sleep(0)  # let requests run between chunks
        return ended

    async def counts(self) -> dict[str, int]:
        return dict(self._counts)

    async def size_bytes(self) -> int:
        return self.bytes

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    # --- synchronous core ---------------------------------------------------------------------------------------

    def get(self, session_id: str) -> Session:
        session = self._live.get(session_id)
        if session is None:
            raise not_found(session_id, self._ended.get(session_id))
        if self._idle_expired(session, self._clock()):
            self._expire(session)
            raise not_found(session_id, self._ended.get(session_id))
        return session

    def sweep_now(self) -> int:
        return sum(self.sweep_in_chunks())

    def sweep_in_chunks(self, chunk: int = 5000) -> Iterator[int]:
        """Ends idle-expired sessions `chunk` at a time, yielding how many each chunk ended, so that a caller on an
        event loop can let other work run between chunks (a full scan of 100k sessions takes ~20 ms)."""
        now = self._clock()
        while self._ended and next(iter(self._ended.values())).at + self.ended_ttl < now:
            self._ended.popitem(last=False)
        snapshot = list(self._live.values())
        for start in range(0, len(snapshot), chunk):
            now = self._clock()
            expired = [
                s for s in snapshot[start : start + chunk] if self._live.get(s.id) is s and self._idle_expired(s, now)
            ]
            for session in expired:
                self._expire(session)
            yield len(expired)

    def live(self) -> list[Session]:
        """Every live session, least recently used first (for a snapshot)."""
        return list(self._live.values())

    def ended(self) -> list[tuple[str, Ended]]:
        return list(self._ended.items())

    def restore(self, sessions: Sequence[Session], ended: Sequence[tuple[str, Ended]]) -> None:
        """Takes sessions and end reasons read from a snapshot, in their LRU order, as if they had never left."""
        for session_id, info in ended:
            self._ended[session_id] = info
        for session in sessions:
            self._add(session)

    def _add(self, session: Session) -> None:
        self._live[session.id] = session
        self._ended.pop(session.id, None)
        self._counts[session.model] += 1
        self._pinned[(session.model, session.version)] += 1
        self._tenants[tenant_of(session.id)] += 1
        self.bytes += len(session.record)

    def _replace(self, session: Session) -> None:
        """The newer record of a live session, now the most recently used."""
        old = self._live.pop(session.id)
        self._live[session.id] = session
        self.bytes += len(session.record) - len(old.record)

    def _make_room(self, growth: int, keep: str) -> None:
        """Keeps the records within max_bytes: ends least recently used sessions (never `keep`), or refuses."""
        if self.bytes + growth <= self.max_bytes:
            return
        detail = f"(least recently used; the records reached max_session_bytes={self.max_bytes})"
        if self.policy is CapacityPolicy.EVICT:
            for victim in [s for s in self._live.values() if s.id != keep]:
                if self.bytes + growth <= self.max_bytes:
                    return
                del self._live[victim.id]
                self._end(victim, EndReason.EVICTED, detail)
        if self.bytes + growth > self.max_bytes:
            raise CapacityExceeded(
                f"the sessions' records would pass max_session_bytes={self.max_bytes}; close sessions or retry later"
            )

    @staticmethod
    def _idle_expired(session: Session, now: float) -> bool:
        return session.idle_ttl > 0 and now - session.last_used > session.idle_ttl

    def _expire(self, session: Session) -> None:
        del self._live[session.id]
        self._end(session, EndReason.EXPIRED, f"after {session.idle_ttl:g} s idle")

    def _end(self, session: Session, reason: EndReason, detail: str) -> None:
        self._ended[session.id] = Ended(reason, self._clock(), detail)
        self._ended.move_to_end(session.id)
        while len(self._ended) > self.max_ended:
            self._ended.popitem(last=False)
        self._counts[session.model] -= 1
        if self._counts[session.model] <= 0:
            del self._counts[session.model]
        pin = (session.model, session.version)
        self._pinned[pin] -= 1
        if self._pinned[pin] <= 0:
            del self._pinned[pin]
        tenant = tenant_of(session.id)
        self._tenants[tenant] -= 1
        if self._tenants[tenant] <= 0:
            del self._tenants[tenant]
        self.bytes -= len(session.record)
        if self._on_end is not None:
            self._on_end(session.model, reason)
