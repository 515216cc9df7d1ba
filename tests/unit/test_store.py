"""Session store: idle TTL, LRU eviction and the remembered end reasons, on an injected clock."""

from __future__ import annotations

import numpy as np
import pytest

from lstm_serve.errors import CapacityExceeded, InvalidInput, SessionExists, SessionNotFound
from lstm_serve.sessions import CapacityPolicy, EndReason, MemorySessionStore, Session, StepWrite, validate_session_id


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _store(clock: Clock, **kwargs: object) -> tuple[MemorySessionStore, list[tuple[str, EndReason]]]:
    ended: list[tuple[str, EndReason]] = []

    def on_end(model: str, reason: EndReason) -> None:
        ended.append((model, reason))

    options: dict[str, object] = {"max_sessions": 3, "default_ttl": 60.0} | kwargs
    store = MemorySessionStore(clock=clock, on_end=on_end, **options)  # type: ignore[arg-type]
    return store, ended


def _state() -> bytes:
    return np.zeros((2, 1, 4), np.float32).tobytes()


async def _use(store: MemorySessionStore, session: Session, clock: Clock) -> Session:
    """A committed step: the session's idle clock restarts and it becomes the most recently used."""
    after = session.stepped(
        session.seq + 1, np.ones((2, 1, 4), np.float32), np.ones(1, np.float32), bytes(16), clock.now
    )
    [result] = await store.commit([StepWrite(session, after)])
    assert isinstance(result, Session)
    assert (result.seq, result.record, result.last_used) == (after.seq, after.record, clock.now)
    return result


async def test_idle_session_expires_after_its_ttl(clock: Clock) -> None:
    store, ended = _store(clock)
    s = await store.create("m", _state(), None, None)
    clock.now += 59.0
    assert store.get(s.id) is s
    s = await _use(store, s, clock)  # use restarts the idle clock
    clock.now += 59.0
    assert store.get(s.id) is s
    clock.now += 2.0
    with pytest.raises(SessionNotFound) as err:
        store.get(s.id)
    assert err.value.reason == "expired"
    assert "expired after 60 s idle" in err.value.message
    assert ended == [("m", EndReason.EXPIRED)]
    assert len(store) == 0


async def test_per_session_ttl_overrides_the_default_and_zero_never_expires(clock: Clock) -> None:
    store, _ = _store(clock)
    short = await store.create("m", _state(), None, 5.0)
    forever = await store.create("m", _state(), None, 0.0)
    clock.now += 10 * 365 * 86400.0
    assert await store.sweep() == 1
    assert store.get(forever.id) is forever
    with pytest.raises(SessionNotFound, match="expired after 5 s idle"):
        store.get(short.id)


async def test_sweep_ends_only_idle_sessions(clock: Clock) -> None:
    store, ended = _store(clock)
    old = await store.create("m", _state(), None, None)
    clock.now += 30.0
    fresh = await store.create("m", _state(), None, None)
    clock.now += 31.0
    assert await store.sweep() == 1
    assert ended == [("m", EndReason.EXPIRED)]
    with pytest.raises(SessionNotFound, match="expired"):
        store.get(old.id)
    assert store.get(fresh.id) is fresh


async def test_sweep_works_in_chunks(clock: Clock) -> None:
    store, ended = _store(clock, max_sessions=10)
    sessions = [await store.create("m", _state(), None, None) for _ in range(5)]
    clock.now += 59
    await _use(store, sessions[2], clock)  # used just now: stays
    clock.now += 2
    assert list(store.sweep_in_chunks(chunk=2)) == [2, 2, 0]  # LRU order: the touched one is last
    assert ended == [("m", EndReason.EXPIRED)] * 4
    assert [x.id for x in store.live()] == [sessions[2].id]


async def test_full_store_evicts_the_least_recently_used(clock: Clock) -> None:
    store, ended = _store(clock)
    a = await store.create("m", _state(), "a", None)
    b = await store.create("m", _state(), "b", None)
    c = await store.create("m", _state(), "c", None)
    clock.now += 1
    a = await _use(store, a, clock)  # b is now the least recently used
    d = await store.create("m", _state(), "d", None)
    assert ended == [("m", EndReason.EVICTED)]
    assert [store.get(x.id) for x in (a, c, d)] == [a, c, d]
    with pytest.raises(SessionNotFound) as err:
        store.get(b.id)
    assert err.value.reason == "evicted"
    assert "max_sessions=3" in err.value.message


async def test_closed_session_reports_closed_and_touch_fails(clock: Clock) -> None:
    store, ended = _store(clock)
    s = await store.create("m", _state(), "x", None)
    await store.close("x")
    with pytest.raises(SessionNotFound) as err:
        store.get("x")
    assert err.value.reason == "closed"
    assert "closed by the client" in err.value.message
    [gone] = await store.commit([StepWrite(s, s.reset(_state(), clock.now))])
    assert isinstance(gone, SessionNotFound)
    assert ended == [("m", EndReason.CLOSED)]


async def test_unknown_session(clock: Clock) -> None:
    store, _ = _store(clock)
    with pytest.raises(SessionNotFound) as err:
        store.get("nope")
    assert err.value.reason == "unknown_session"


async def test_end_reasons_are_forgotten_after_a_while_and_bounded(clock: Clock) -> None:
    store, _ = _store(clock, max_sessions=10, ended_ttl=100.0, max_ended=2)
    for name in ("a", "b", "c"):
        await store.create("m", _state(), name, None)
        await store.close(name)
    with pytest.raises(SessionNotFound) as err:
        store.get("a")  # pushed out by the bound of 2
    assert err.value.reason == "unknown_session"
    clock.now += 101
    await store.sweep()
    with pytest.raises(SessionNotFound) as err:
        store.get("c")
    assert err.value.reason == "unknown_session"


async def test_client_ids_are_checked_and_unique(clock: Clock) -> None:
    store, _ = _store(clock)
    await store.create("m", _state(), "device-17:a.b", None)
    with pytest.raises(SessionExists):
        await store.create("m", _state(), "device-17:a.b", None)
    # a store key may carry a tenant prefix ("acme/b", see session_key), but no more than one, and a valid one
    for bad in ("has space", "x" * 129, "ümlaut", "a/b/c", "/b", "a:b/c", "t" * 65 + "/b"):
        with pytest.raises(InvalidInput):
            await store.create("m", _state(), bad, None)
    for bad in ("a/b", "/b"):  # ... which no client id holds
        with pytest.raises(InvalidInput):
            validate_session_id(bad)
    await store.close("device-17:a.b")
    assert (await store.create("m", _state(), "device-17:a.b", None)).seq == 0  # a closed id may be used again


async def test_generated_ids_are_long_and_distinct(clock: Clock) -> None:
    store, _ = _store(clock, max_sessions=1000)
    ids = {(await store.create("m", _state(), None, None)).id for _ in range(500)}
    assert len(ids) == 500
    assert min(len(i) for i in ids) >= 22  # 128 bits in base64url


async def test_an_expired_but_unswept_id_can_be_created_again(clock: Clock) -> None:
    store, ended = _store(clock)
    await store.create("m", _state(), "dev-1", 10.0)
    clock.now += 11
    again = await store.create("m", _state(), "dev-1", None)
    assert again.seq == 0
    assert ended == [("m", EndReason.EXPIRED)]


async def test_the_records_stay_within_the_byte_budget(clock: Clock) -> None:
    """A long step stores a long reply (for its retry): the budget counts it, and evicts the least recently used."""
    zero = _state()  # 32 bytes
    store, ended = _store(clock, max_sessions=100, max_bytes=1000)
    a = await store.create("m", zero, "a", None)
    b = await store.create("m", zero, "b", None)
    assert store.bytes == 64
    long_reply = np.ones((200, 1), np.float32)  # 800 bytes of outputs
    after = a.stepped(1, np.ones((2, 1, 4), np.float32), long_reply, bytes(16), clock.now)
    [stored] = await store.commit([StepWrite(a, after)])
    assert isinstance(stored, Session)
    assert store.bytes == 32 + 16 + 800 + 32
    big = b.stepped(1, np.ones((2, 1, 4), np.float32), long_reply, bytes(16), clock.now)
    [done] = await store.commit([StepWrite(b, big)])  # does not fit beside a: a, least recently used, goes
    assert isinstance(done, Session)
    assert ended == [("m", EndReason.EVICTED)]
    with pytest.raises(SessionNotFound, match="max_session_bytes=1000"):
        store.get("a")
    assert store.bytes == 848 <= 1000


async def test_the_refuse_policy_refuses_a_step_past_the_byte_budget(clock: Clock) -> None:
    store, ended = _store(clock, max_sessions=100, max_bytes=600, policy=CapacityPolicy.REFUSE)
    a = await store.create("m", _state(), "a", None)
    await store.create("m", _state(), "b", None)
    after = a.stepped(1, np.ones((2, 1, 4), np.float32), np.ones((200, 1), np.float32), bytes(16), clock.now)
    [refused] = await store.commit([StepWrite(a, after)])
    assert isinstance(refused, CapacityExceeded)
    assert store.get("a").seq == 0  # unchanged
    assert ended == []
    assert store.bytes == 64
