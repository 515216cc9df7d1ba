"""The SessionStore contract, held by both stores: the in-memory one and Redis (a real redis-server on loopback).

The same test body runs against each; idle expiry uses the real clock with sub-second TTLs, since Redis keeps time
itself.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from lstm_serve.errors import CapacityExceeded, SessionExists, SessionNotFound
from lstm_serve.sessions import CapacityPolicy, EndReason, MemorySessionStore, Session, SessionStore, Stale, StepWrite
from lstm_serve.sessions.redis_store import RedisSessionStore
from tests.procs import RedisServer

ZERO = np.zeros((2, 1, 4), np.float32).tobytes()
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


Factory = Callable[..., SessionStore]
Made = tuple[Factory, list[tuple[str, EndReason]]]


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[Made]:
    ended: list[tuple[str, EndReason]] = []
    made: list[SessionStore] = []

    def on_end(model: str, reason: EndReason) -> None:
        ended.append((model, reason))

    def make(**options: object) -> SessionStore:
        kwargs: dict[str, object] = {"max_sessions": 100, "default_ttl": 60.0, "on_end": on_end} | options
        if request.param == "memory":
            store: SessionStore = MemorySessionStore(**kwargs)  # type: ignore[arg-type]
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            prefix = f"t{next(_prefixes)}:"
            store = RedisSessionStore(server.url, prefix=prefix, **kwargs)  # type: ignore[arg-type]
        made.append(store)
        return store

    yield make, ended
    for store in made:
        await store.aclose()


def _step(session: Session, value: float) -> StepWrite:
    """A step of `session`, stamped with the time now (what the data plane takes from store.now())."""
    state = np.full((2, 1, 4), value, np.float32)
    outputs = np.full(1, value, np.float32)
    return StepWrite(session, session.stepped(session.seq + 1, state, outputs, bytes(16), time.time()))


async def _get(store: SessionStore, session_id: str, *, fresh: bool = True) -> Session:
    [found] = await store.load([session_id], fresh=fresh)
    if isinstance(found, SessionNotFound):
        raise found
    return found


async def test_create_load_commit_round_trip(make_store: Made) -> None:
    make, _ = make_store
    store = make()
    s = await store.create("m", ZERO, "dev-1", None)
    assert (s.id, s.model, s.seq, s.steps, s.idle_ttl) == ("dev-1", "m", 0, 0, 60.0)
    [done] = await store.commit([_step(s, 1.0)])
    assert isinstance(done, Session)
    got = await _get(store, "dev-1")
    assert (got.seq, got.steps, got.rev) == (1, 1, done.rev)
    assert got.record == done.record
    np.testing.assert_array_equal(got.state_array((2, 1, 4)), np.ones((2, 1, 4), np.float32))
    assert await store.counts() == {"m": 1}


async def test_commit_is_a_compare_and_set_on_the_revision(
    make_store: Made,
) -> None:
    """Two writers computed from the same record: exactly one lands; the other gets the current record back."""
    make, _ = make_store
    store = make()
    base = await store.create("m", ZERO, None, None)
    [first] = await store.commit([_step(base, 1.0)])
    [second] = await store.commit([_step(base, 2.0)])
    assert isinstance(first, Session)
    assert isinstance(second, Stale)
    assert second.current.rev == first.rev
    assert second.current.record == first.record
    assert (await _get(store, base.id)).seq == 1


async def test_a_batch_commits_each_write_on_its_own(make_store: Made) -> None:
    make, _ = make_store
    store = make()
    a, b, c = [await store.create("m", ZERO, name, None) for name in "abc"]
    await store.close("c")
    stale_b = b
    [b_now] = await store.commit([_step(b, 5.0)])
    assert isinstance(b_now, Session)
    results = await store.commit([_step(a, 1.0), _step(stale_b, 2.0), _step(c, 3.0)])
    assert isinstance(results[0], Session)
    assert isinstance(results[1], Stale)
    assert isinstance(results[2], SessionNotFound)
    assert results[2].reason == "closed"


async def test_reset_zeroes_the_state_keeps_seq_and_invalidates_older_writes(
    make_store: Made,
) -> None:
    make, _ = make_store
    store = make()
    s = await store.create("m", ZERO, None, None)
    [stepped] = await store.commit([_step(s, 3.0)])
    assert isinstance(stepped, Session)
    reset = await store.reset(s.id, ZERO)
    assert (reset.seq, reset.steps) == (1, 1)
    assert reset.record[: len(ZERO)] == ZERO
    assert reset.record[len(ZERO) :] == stepped.record[len(ZERO) :]  # the stored reply survives a reset
    [late] = await store.commit([_step(stepped, 4.0)])  # computed before the reset: must not land
    assert isinstance(late, Stale)


async def test_end_reasons_closed_and_unknown(make_store: Made) -> None:
    make, ended = make_store
    store = make()
    await store.create("m", ZERO, "x", None)
    closed = await store.close("x")
    assert closed.id == "x"
    with pytest.raises(SessionNotFound, match="closed by the client") as err:
        await _get(store, "x")
    assert err.value.reason == "closed"
    with pytest.raises(SessionNotFound) as err:
        await _get(store, "never-was")
    assert err.value.reason == "unknown_session"
    with pytest.raises(SessionNotFound):
        await store.close("x")
    assert ended == [("m", EndReason.CLOSED)]
    assert (await store.create("m", ZERO, "x", None)).seq == 0  # a closed id may be used again


async def test_a_burst_of_creates_waits_for_connections_instead_of_failing(make_store: Made) -> None:
    make, _ = make_store
    store = make(max_sessions=1000)
    created = await asyncio.gather(*(store.create("m", ZERO, None, None) for _ in range(300)))
    assert len({s.id for s in created}) == 300
    assert await store.counts() == {"m": 300}


async def test_ids_are_unique_among_live_sessions(make_store: Made) -> None:
    make, _ = make_store
    store = make()
    await store.create("m", ZERO, "dup", None)
    with pytest.raises(SessionExists):
        await store.create("m", ZERO, "dup", None)


async def test_idle_sessions_expire_with_the_reason_and_are_counted_once(
    make_store: Made,
) -> None:
    make, ended = make_store
    store = make(default_ttl=0.3)
    short = await store.create("m", ZERO, None, None)
    forever = await store.create("m", ZERO, None, 0.0)
    kept = await store.create("m", ZERO, None, None)
    for _ in range(4):  # used every 0.15 s: never idle for 0.3 s
        await asyncio.sleep(0.15)
        [kept] = await store.commit([_step(kept, 1.0)])  # type: ignore[assignment]
        assert isinstance(kept, Session)
    assert await store.sweep() == 1
    assert await store.sweep() == 0
    with pytest.raises(SessionNotFound, match=r"expired after 0\.3 s idle") as err:
        await _get(store, short.id)
    assert err.value.reason == "expired"
    assert (await _get(store, forever.id)).idle_ttl == 0
    assert ended == [("m", EndReason.EXPIRED)]
    assert await store.counts() == {"m": 2}


async def test_expiry_noticed_on_read_is_counted_once(make_store: Made) -> None:
    make, ended = make_store
    store = make(default_ttl=0.2)
    s = await store.create("m", ZERO, None, None)
    await asyncio.sleep(0.3)
    for _ in range(2):
        with pytest.raises(SessionNotFound, match="expired"):
            await _get(store, s.id)
    assert await store.sweep() == 0
    assert ended == [("m", EndReason.EXPIRED)]
    assert await store.counts() == {}


async def test_full_store_evicts_the_least_recently_used(
    make_store: Made,
) -> None:
    make, ended = make_store
    store = make(max_sessions=3)
    a = await store.create("m", ZERO, "a", None)
    await store.create("m", ZERO, "b", None)
    await store.create("m", ZERO, "c", None)
    await asyncio.sleep(0.01)
    [a_used] = await store.commit([_step(a, 1.0)])  # b is now the least recently used
    assert isinstance(a_used, Session)
    await store.create("m", ZERO, "d", None)
    with pytest.raises(SessionNotFound, match="max_sessions=3") as err:
        await _get(store, "b")
    assert err.value.reason == "evicted"
    for alive in "acd":
        await _get(store, alive)
    assert ended == [("m", EndReason.EVICTED)]
    assert await store.counts() == {"m": 3}


async def test_refuse_policy_keeps_everyone(make_store: Made) -> None:
    make, ended = make_store
    store = make(max_sessions=2, policy=CapacityPolicy.REFUSE)
    await store.create("m", ZERO, "a", None)
    await store.create("n", ZERO, "b", None)
    with pytest.raises(CapacityExceeded, match="max_sessions=2"):
        await store.create("m", ZERO, "c", None)
    await store.close("a")
    await store.create("m", ZERO, "c", None)
    assert await store.counts() == {"m": 1, "n": 1}
    assert ended == [("m", EndReason.CLOSED)]


async def test_tenant_keys_are_counted_per_tenant_and_never_shown(make_store: Made) -> None:
    """Keys "tenant/id" (sessions.session_key): a limit per tenant, store-wide, that every way of ending a session gives
    back; messages name the client's id only."""
    make, _ = make_store
    store = make(max_sessions=10, default_ttl=0.3)
    await store.create("m", ZERO, "acme/a", None, tenant_limit=2)
    await store.create("m", ZERO, "acme/b", 0.0, tenant_limit=2)
    with pytest.raises(CapacityExceeded, match="your tenant holds 2 live sessions") as full:
        await store.create("m", ZERO, "acme/c", None, tenant_limit=2)
    assert "acme" not in full.value.message
    await store.create("m", ZERO, "other/a", 0.0, tenant_limit=2)  # another tenant, the same client id
    await store.create("m", ZERO, "plain", 0.0, tenant_limit=2)  # the anonymous tenant "" is one more tenant
    with pytest.raises(SessionExists) as exists:
        await store.create("m", ZERO, "acme/a", None, tenant_limit=2)
    assert exists.value.message == "session 'a' already exists"
    await asyncio.sleep(0.4)  # acme/a expires (unswept): its place is free
    await store.create("m", ZERO, "acme/c", None, tenant_limit=2)
    await store.close("acme/c")
    await store.end("acme/b", EndReason.MODEL_CHANGED, "(changed)")
    for name in ("d", "e"):
        await store.create("m", ZERO, f"acme/{name}", 0.0, tenant_limit=2)
    gone_ones = (("acme/c", "'c' was closed"), ("acme/a", "'a' was expired"), ("acme/zz", "unknown session 'zz'"))
    for key, shown in gone_ones:
        with pytest.raises(SessionNotFound) as gone:
            await _get(store, key)
        assert shown in gone.value.message
        assert "acme" not in gone.value.message
    assert (await _get(store, "other/a")).id == "other/a"


async def test_end_for_a_server_reason(make_store: Made) -> None:
    make, ended = make_store
    store = make()
    await store.create("m", ZERO, "old", None)
    await store.end("old", EndReason.MODEL_CHANGED, "(model 'm' changed its state shape)")
    with pytest.raises(SessionNotFound, match="changed its state shape") as err:
        await _get(store, "old")
    assert err.value.reason == "model_changed"
    await store.end("old", EndReason.MODEL_CHANGED, "again")  # already gone: nothing happens
    assert ended == [("m", EndReason.MODEL_CHANGED)]


async def test_two_redis_stores_share_sessions_and_caches_are_validated(redis_server: RedisServer) -> None:
    """Two replicas: A's cache is stale after B's step; A's commit from it loses, and A learns the current record."""
    prefix = f"shared{next(_prefixes)}:"
    a = RedisSessionStore(redis_server.url, prefix=prefix, max_sessions=10, default_ttl=60)
    b = RedisSessionStore(redis_server.url, prefix=prefix, max_sessions=10, default_ttl=60)
    try:
        s = await a.create("m", ZERO, "shared", None)
        on_b = await _get(b, "shared")
        [b_done] = await b.commit([_step(on_b, 7.0)])
        assert isinstance(b_done, Session)
        cached = await _get(a, "shared", fresh=False)
        assert cached.rev == s.rev  # A still believes its own copy
        [a_try] = await a.commit([_step(cached, 9.0)])
        assert isinstance(a_try, Stale)
        assert a_try.current.record == b_done.record
        assert (await _get(a, "shared", fresh=False)).rev == b_done.rev  # the cache now holds the truth
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_down_is_store_unavailable_and_recovers(tmp_path: Path) -> None:
    from lstm_serve.errors import StoreUnavailable

    with RedisServer(tmp_path, appendonly="always") as server:
        store = RedisSessionStore(server.url, max_sessions=10, default_ttl=60, timeout=0.5)
        try:
            s = await store.create("m", ZERO, "keep", None)
            [stepped] = await store.commit([_step(s, 1.0)])
            server.kill9()
            with pytest.raises(StoreUnavailable):
                await store.ping()
            with pytest.raises(StoreUnavailable):
                await store.commit([_step(stepped, 2.0)])  # type: ignore[arg-type]
            server.start().wait_ready()
            await store.ping()
            got = await _get(store, "keep")
            assert (got.seq, got.record) == (1, stepped.record)  # type: ignore[union-attr]
        finally:
            await store.aclose()


async def test_sessions_keep_the_model_version_they_were_created_on(make_store: Made) -> None:
    make, ended = make_store
    store = make()
    old = await store.create("m", ZERO, "on-v1", None)
    new = await store.create("m", ZERO, "on-v3", None, version=3)
    assert (old.version, new.version) == (1, 3)  # 1: the default, and what records from before versions read as
    [stepped] = await store.commit([_step(new, 2.0)])
    assert isinstance(stepped, Session)
    again = await _get(store, "on-v3")
    assert (again.version, again.seq) == (3, 1)
    reset = await store.reset("on-v3", ZERO)
    assert reset.version == 3
    pinned = await store.pinned("m", 3)
    assert pinned in (1, None)  # the memory store counts; Redis does not (a retired version waits for its deadline)
    ended_now = await store.end_version("m", 3, EndReason.MODEL_RETIRED, "(model 'm' version 3 was retired)")
    if pinned is None:
        assert ended_now == 0  # Redis: each one ends when next used (DataPlane._fitting)
        assert (await _get(store, "on-v3")).version == 3
    else:
        assert ended_now == 1
        assert await store.pinned("m", 3) == 0
        with pytest.raises(SessionNotFound) as gone:
            await _get(store, "on-v3")
        assert gone.value.reason == "model_retired"
        assert ("m", EndReason.MODEL_RETIRED) in ended
    assert (await _get(store, "on-v1")).version == 1  # another version's session is left alone


async def test_redis_records_from_before_versions_read_as_version_1(redis_server: RedisServer) -> None:
    store = RedisSessionStore(redis_server.url, prefix=f"t{next(_prefixes)}:", max_sessions=10, default_ttl=60.0)
    try:
        await store.create("m", ZERO, "legacy", None, version=4)
        redis_server.client().hdel(f"{store.prefix}s:legacy", "v")  # as an older server wrote it
        [found] = await store.load(["legacy"], fresh=True)
        assert isinstance(found, Session)
        assert found.version == 1
    finally:
        await store.aclose()
