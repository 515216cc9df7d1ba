"""The step path: every step applied exactly once, and the steps of one loop turn read, computed and committed
together.

Why a turn: gRPC hands the server its messages one callback at a time, and a step alone pays for a store read, a
backend call and a store commit of its own. The steps that arrive in the same turn of the event loop (the requests of
many streams, a StepMany message) cost one store read, one backend call per model and one store commit together,
for one turn of waiting: `submit` collects them and `call_soon` flushes them. Each step gets a future, not a task;
a stream answers from the future's callback.

Exactly once: the session lock keeps this process's steps of one session in order; the store's compare-and-set on
the record's revision makes check-compute-commit atomic across processes. A batch takes the locks it can get at once
and settles the common case (the next seq, a current record) itself; every other step (a retry, a lock held by
another call, a lost compare-and-set, a session named twice) goes through `_step_locked`, the single step's path,
in arrival order for each session.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lstm_serve.batching import Batcher
from lstm_serve.engine.cell import F32
from lstm_serve.engine.gates import GateTrace
from lstm_serve.engine.model import Model, ModelInfo
from lstm_serve.errors import (
    InvalidInput,
    LimitExceeded,
    LstmServeError,
    ModelNotFound,
    SequenceMismatch,
    SessionNotFound,
    ShuttingDown,
    StoreUnavailable,
)
from lstm_serve.keyed_lock import KeyedLock
from lstm_serve.metrics import Metrics
from lstm_serve.sessions import CommitResult, Session, SessionStore, Stale, StepWrite, input_digest, session_key

PATIENCE = 16  # loop turns a batch waits for the next step, while batches find company
GATHER_MAX = 0.002  # a batch waits for company this long at most
MAX_COMMIT_ATTEMPTS = 4  # a step recomputed after losing its compare-and-set this often is answered UNAVAILABLE

# Finite inputs so large that the arithmetic overflows (a sum of +Inf and -Inf terms is NaN) must not become a
# session's state: a NaN state would poison every later step. Refused like any bad input, nothing applied.
OVERFLOW = "inputs too large: the model's arithmetic overflows to Inf or NaN; nothing was applied"


@dataclass(frozen=True, slots=True)
class StepItem:
    """One session's step: x is (I,) or (T, I)."""

    session_id: str
    seq: int
    x: F32


@dataclass(frozen=True, slots=True)
class StepOutcome:
    session_id: str
    seq: int
    outputs: F32  # (O,) or (T, O), following the request
    gates: GateTrace | None = None  # a step that asked for its internals, computed (a replayed one has none)


@dataclass(frozen=True, slots=True)
class _Job:
    """A step on the batched path: its lock held, its session read, its inputs shaped."""

    item: int
    key: str
    session: Session
    xs: F32  # (T, I)
    single: bool
    digest: bytes


Outcome = StepOutcome | Exception  # an exception that is not an LstmServeError is a bug: the transport says INTERNAL


def shape_inputs(x: F32, info: ModelInfo, max_steps: int) -> tuple[F32, bool]:
    """x as (T, I), and whether the request held a single step; raises InvalidInput (or LimitExceeded) with the
    reason. Finiteness is checked apart (`check_finite`, or for a batch by the backend's finiteness flag)."""
    if x.ndim not in (1, 2):
        raise InvalidInput(
            f"inputs must have shape [{info.input_size}] or [T, {info.input_size}], got {list(x.shape)}", "inputs"
        )
    single = x.ndim == 1
    xs = x.reshape(1, -1) if single else x
    if xs.shape[0] == 0:
        raise InvalidInput("inputs hold no time step (T = 0)", "inputs")
    if xs.shape[1] != info.input_size:
        raise InvalidInput(
            f"model {info.name!r} takes {info.input_size} input features, got {xs.shape[1]} "
            f"(inputs shape {list(x.shape)})",
            "inputs",
        )
    if xs.shape[0] > max_steps:
        raise LimitExceeded(f"{xs.shape[0]} time steps in one request; the limit is {max_steps}")
    return xs, single


def check_finite(xs: F32) -> None:
    if not np.isfinite(xs).all():
        bad = np.argwhere(~np.isfinite(xs))[0]
        raise InvalidInput(f"inputs contain NaN or Inf (first at step {bad[0]}, feature {bad[1]})", "inputs")


class Stepper:
    def __init__(
        self,
        model: Callable[[str, int], Model],
        store: SessionStore,
        batchers: dict[tuple[str, int], Batcher],
        metrics: Metrics,
        *,
        max_steps: int,
        inline_max_steps: int,
        max_wait: float,
        max_batch: int,
        load: Callable[..., Awaitable[Session]],
        fitting: Callable[[Session, str, str], Awaitable[Session]],
        commit: Callable[[StepWrite], Awaitable[CommitResult]],
        offload: Callable[[ModelInfo, int, Callable[[], GateTrace]], Awaitable[GateTrace]],
    ) -> None:
        self._model = model  # (name, version) -> the model; raises ModelNotFound with the reason
        self._batchers = batchers  # by ModelInfo.key; a reload changes the dict in place
        self.store = store
        self.metrics = metrics
        self._max_steps = max_steps
        self._inline_max_steps = inline_max_steps
        self._load = load  # (key, session_id, fresh=) -> the session, checked against its model
        self._fitting = fitting  # (found, key, session_id) -> found, unless it no longer fits its model
        self._commit_one = commit  # one step's commit, coalesced with the turn's others into one store call
        self._offload = offload  # (info, steps, work): work on the loop when small, else in the compute threads
        self._max_wait = max_wait
        self._max_batch = max_batch
        self._gather_started = 0.0
        self._gathered = self._idle_turns = 0  # the turn's batch so far; loop turns since it last grew
        self._patience = 1
        self.locks = KeyedLock()
        self._turn: list[tuple[str, StepItem, asyncio.Future[StepOutcome]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # --- the turn -----------------------------------------------------------------------------------------------

    def submit(self, item: StepItem, tenant: str) -> asyncio.Future[StepOutcome]:
        """The step's future, settled once the turn's batch is through; a cancelled future only stops waiting (the
        step may still be applied: its retry then gets the stored reply)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[StepOutcome] = loop.create_future()
        if not self._turn:
            self._gather_started = time.perf_counter()
            if self._max_wait > 0 and self._patience > 1:  # --max-batch-wait: a busy step path waits this long
                loop.call_later(self._max_wait, self._end_gathering)
            else:
                self._gathered = self._idle_turns = 0
                loop.call_soon(self._gather)
        self._turn.append((tenant, item, future))
        return future

    def _gather(self) -> None:
        """Flushes the batch once `patience` loop turns went by without a new step (the turn the batch began in
        counting as one). gRPC hands a call to its handler
        over several turns, so concurrent callers' steps trickle in a few turns apart (unary calls especially): a
        batch that found company makes the next one wait PATIENCE turns for more; each lone batch halves that, so a
        lone caller in ping-pong with the server pays one turn. Bounded by GATHER_MAX and max_batch. Under load,
        a wait of a few hundred microseconds saves a backend call and two store calls per step it gathers."""
        size = len(self._turn)
        self._idle_turns = 0 if size > self._gathered else self._idle_turns + 1
        self._gathered = size
        waited = time.perf_counter() - self._gather_started
        if self._idle_turns < self._patience - 1 and size < self._max_batch and waited < GATHER_MAX:
            asyncio.get_running_loop().call_soon(self._gather)
            return
        self._end_gathering()

    def _end_gathering(self) -> None:
        self._patience = PATIENCE if len(self._turn) > 1 else max(1, self._patience // 2)
        self._flush()

    def _flush(self) -> None:
        turn, self._turn = self._turn, []
        arrived = self._gather_started
        batches: dict[str, tuple[list[StepItem], list[asyncio.Future[StepOutcome]]]] = {}
        alone: list[tuple[str, StepItem, asyncio.Future[StepOutcome]]] = []  # on the single step's path
        for tenant, item, future in turn:
            if future.done():
                continue
            if item.x.ndim == 2 and len(item.x) > self._inline_max_steps:  # long: alone, never holding short ones
                alone.append((tenant, item, future))
                continue
            items, futures = batches.setdefault(tenant, ([], []))
            items.append(item)
            futures.append(future)
        for tenant, (items, futures) in batches.items():
            if len(items) == 1:  # a lone step: the single step's path is the shorter one
                alone.append((tenant, items[0], futures[0]))
            else:
                self._spawn(self._settle(futures, self.step_batch(items, tenant, arrived)))
        for tenant, item, future in alone:
            self._spawn(self._settle([future], self._alone_outcomes(item, tenant, arrived)))

    async def _alone_outcomes(self, item: StepItem, tenant: str, arrived: float) -> list[Outcome]:
        try:
            return [await self.step_alone(item, tenant, arrived)]
        except Exception as exc:
            return [exc]

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _settle(futures: list[asyncio.Future[StepOutcome]], outcomes: Awaitable[list[Outcome]]) -> None:
        try:
            results = await outcomes
        except Exception as exc:
            results = [exc] * len(futures)
        except BaseException:  # cancelled (shutdown): nobody is left with a future that never settles
            for future in futures:
                if not future.done():
                    future.set_exception(ShuttingDown("the server is shutting down; retry"))
            raise
        for future, result in zip(futures, results, strict=True):
            if future.done():
                continue
            if isinstance(result, StepOutcome):
                future.set_result(result)
            else:
                future.set_exception(result)

    async def close(self) -> None:
        """Lets the batches in flight finish (at shutdown, so that no commit is cut in half)."""
        self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- a batch ------------------------------------------------------------------------------------------------

    async def step_many(self, items: Sequence[StepItem], tenant: str) -> list[Outcome]:
        """A message carrying many sessions' steps: bounded in time steps as one request is."""
        total = sum(len(item.x) if item.x.ndim == 2 else 1 for item in items)
        if total > self._max_steps:
            raise LimitExceeded(f"{total} time steps in one request; the limit is {self._max_steps}")
        return await self.step_batch(items, tenant)

    async def step_batch(self, items: Sequence[StepItem], tenant: str, arrived: float | None = None) -> list[Outcome]:
        """Every item's outcome, in order; `arrived`: when the first of them reached the step path (perf_counter),
        for the wait the step latency metrics report."""
        out: list[Outcome | None] = [None] * len(items)
        mine: dict[str, int] = {}  # key -> the item this call holds the key's lock for
        queued: list[int] = []  # items that wait for their key's lock, in order
        for i, item in enumerate(items):
            try:
                key = session_key(tenant, item.session_id)
            except LstmServeError as exc:
                out[i] = exc
                continue
            if key not in mine and self.locks.try_acquire(key):
                mine[key] = i
            else:
                queued.append(i)
        later = [asyncio.ensure_future(self.step_alone(items[i], tenant)) for i in queued]
        try:
            try:
                if mine:
                    await self._held(items, mine, out, arrived)
            finally:
                for key in mine:
                    self.locks.release(key)
            if later:
                for i, done in zip(queued, await asyncio.gather(*later, return_exceptions=True), strict=True):
                    out[i] = _outcome(done)
        finally:
            for task in later:
                task.cancel()
        return [o if o is not None else RuntimeError("step left unanswered") for o in out]

    async def _held(
        self, items: Sequence[StepItem], mine: dict[str, int], out: list[Outcome | None], arrived: float | None
    ) -> None:
        """The items whose locks this call holds: read together, computed together, committed together."""
        started = time.perf_counter()
        wait = started - arrived if arrived is not None else 0.0
        try:
            found = await self.store.load(list(mine), fresh=False)
        except LstmServeError as exc:
            for i in mine.values():
                out[i] = exc
            return
        jobs: dict[tuple[str, int], list[_Job]] = {}  # by model version
        general: list[tuple[int, str, Session, Stale | None]] = []  # to the single step's path, lock held
        infos: dict[tuple[str, int], ModelInfo | None] = {}  # looked up once per model version in the batch
        for (key, i), session in zip(mine.items(), found, strict=True):
            item = items[i]
            if isinstance(session, SessionNotFound):
                out[i] = session
                continue
            if item.seq != session.seq + 1:
                general.append((i, key, session, None))
                continue
            pin = (session.model, session.version)
            if pin not in infos:
                try:
                    infos[pin] = self._model(session.model, session.version).info
                except ModelNotFound:  # a version not served here: `_fitting` adopts it, or ends the session
                    infos[pin] = None
            info = infos[pin]
            if info is None:
                general.append((i, key, session, None))
                continue
            if not session.fits(info.state_shape, info.output_size):
                general.append((i, key, session, None))  # `_fitting` ends it, with the reason
                continue
            try:
                xs, single = shape_inputs(item.x, info, self._max_steps)
            except LstmServeError as exc:
                out[i] = exc
                continue
            jobs.setdefault(info.key, []).append(_Job(i, key, session, xs, single, input_digest(xs)))
        writes: list[tuple[_Job, F32, StepWrite]] = []
        now = self.store.now()
        computed: list[tuple[str, int, float]] = []  # (model, steps, compute seconds) per model version
        for version_key, group in jobs.items():
            batcher = self._batchers[version_key]
            shape = batcher.model.info.state_shape
            begun = time.perf_counter()
            try:
                results = await batcher.submit_many(
                    [j.xs for j in group], [j.session.state_array(shape) for j in group]
                )
            except Exception as exc:  # a backend failure fails this model's steps; their sessions keep their state
                for j in group:
                    out[j.item] = exc
                continue
            computed.append((version_key[0], len(group), time.perf_counter() - begun))
            for j, (ys, state, finite) in zip(group, results, strict=True):
                if not finite:
                    try:
                        check_finite(j.xs)  # NaN or Inf given, or the arithmetic overflowed
                        out[j.item] = InvalidInput(OVERFLOW, "inputs")
                    except InvalidInput as exc:
                        out[j.item] = exc
                    continue
                outputs = ys[0] if j.single else ys
                after = j.session.stepped(items[j.item].seq, state, outputs, j.digest, now)
                writes.append((j, outputs, StepWrite(j.session, after)))
        committing = time.perf_counter()
        if writes:
            await self._commit(items, writes, out, general)
        store = time.perf_counter() - committing
        for model, size, compute in computed:
            self.metrics.batch_timing(model, size, wait, compute, store)
        if general:
            done = await asyncio.gather(
                *(self._general(items[i], key, session, lost) for i, key, session, lost in general),
                return_exceptions=True,
            )
            for (i, *_), outcome in zip(general, done, strict=True):
                out[i] = _outcome(outcome)

    async def _commit(
        self,
        items: Sequence[StepItem],
        writes: list[tuple[_Job, F32, StepWrite]],
        out: list[Outcome | None],
        general: list[tuple[int, str, Session, Stale | None]],
    ) -> None:
        committed: Sequence[CommitResult | LstmServeError]
        try:
            committed = await self.store.commit([write for _, _, write in writes])
        except LstmServeError as exc:
            committed = [exc] * len(writes)
        applied: dict[str, int] = {}
        for (j, outputs, write), result in zip(writes, committed, strict=True):
            if isinstance(result, Session):
                applied[write.base.model] = applied.get(write.base.model, 0) + len(j.xs)
                item = items[j.item]
                out[j.item] = StepOutcome(item.session_id, item.seq, outputs)
            elif isinstance(result, Stale):
                general.append((j.item, j.key, write.base, result))  # decided again from the store's record
            else:
                out[j.item] = result
        for name, count in applied.items():
            self.metrics.child(self.metrics.steps, name).inc(count)

    async def _general(self, item: StepItem, key: str, session: Session, lost: Stale | None) -> StepOutcome:
        """An item the batch did not settle, on the single step's path (its lock held)."""
        if lost is not None:
            session = await self._lost_commit(lost, session, key, item.session_id)
            return await self._step_locked(key, item, session, fresh=True, attempts=1)
        session = await self._fitting(session, key, item.session_id)
        return await self._step_locked(key, item, session, fresh=self.store.authoritative)

    # --- one step -----------------------------------------------------------------------------------------------

    async def step_alone(self, item: StepItem, tenant: str, arrived: float | None = None) -> StepOutcome:
        """A step on its own: waits for its session's lock (in arrival order), then decides as `_step_locked`."""
        key = session_key(tenant, item.session_id)
        await self.locks.acquire(key)
        try:
            session = await self._load(key, item.session_id, fresh=False)
            return await self._step_locked(key, item, session, fresh=self.store.authoritative, arrived=arrived)
        finally:
            self.locks.release(key)

    async def step_with_gates(self, item: StepItem, tenant: str) -> StepOutcome:
        """A step that also answers the cell's internals of every time step (engine/gates.py), on the single step's
        path: the same lock, the same decision on seq (a retry replays the stored outputs, without gates: the state
        they came from is gone), the same compare-and-set commit of the served computation's state. The gates come
        from a second computation from the same previous state, paid only here."""
        key = session_key(tenant, item.session_id)
        await self.locks.acquire(key)
        try:
            session = await self._load(key, item.session_id, fresh=True)
            return await self._step_locked(key, item, session, fresh=True, gates=True)
        finally:
            self.locks.release(key)

    async def _step_locked(
        self,
        key: str,
        item: StepItem,
        session: Session,
        *,
        fresh: bool,
        attempts: int = 0,
        gates: bool = False,
        arrived: float | None = None,
    ) -> StepOutcome:
        """A session read from a cache may be stale: only "this is the next step" is acted on without asking the
        store, and a step computed from a stale record loses its compare-and-set, which hands back the current
        record to decide again from (typically: the step was applied elsewhere, so its stored reply is replayed).
        The state is replaced only by a commit, so a failure or a cancelled call changes nothing. `fresh`: the
        session is known current; `attempts`: compare-and-sets lost already."""
        seq = item.seq
        checked: ModelInfo | None = None
        for _ in range(attempts, MAX_COMMIT_ATTEMPTS):
            # again after every re-read: the id may now name another model (or version)
            model = self._model(session.model, session.version)
            info = model.info
            if info is not checked:
                xs, single = shape_inputs(item.x, info, self._max_steps)
                check_finite(xs)
                digest = input_digest(xs)
                checked = info
            if seq != session.seq + 1:
                if not fresh:  # a cached record may lag behind the store: look before refusing or replaying
                    session, fresh = await self._load(key, item.session_id, fresh=True), True
                    continue
                outputs = self._replay(session, item.session_id, seq, digest, info)
                return StepOutcome(item.session_id, seq, outputs[0] if single else outputs)
            previous = session.state_array(info.state_shape)
            cell = await asyncio.to_thread(model.gate_cell) if gates else None  # Unsupported before anything runs
            begun = time.perf_counter()
            [(ys, new_state, finite)] = await self._batchers[info.key].submit_many([xs], [previous])
            compute = time.perf_counter() - begun
            if not finite:
                raise InvalidInput(OVERFLOW, "inputs")
            trace = None
            if cell is not None:
                trace = await self._offload(info, len(xs), functools.partial(cell.trace, xs, np.array(previous)))
            outputs = ys[0] if single else ys
            after = session.stepped(seq, new_state, outputs, digest, self.store.now())
            committing = time.perf_counter()
            result = await self._commit_one(StepWrite(session, after))
            wait = begun - arrived if arrived is not None else 0.0
            self.metrics.batch_timing(info.name, 1, wait, compute, time.perf_counter() - committing)
            if isinstance(result, Session):
                self.metrics.child(self.metrics.steps, info.name).inc(len(xs))
                return StepOutcome(item.session_id, seq, outputs, trace)
            session = await self._lost_commit(result, session, key, item.session_id)
            fresh = True
        raise StoreUnavailable(f"session {item.session_id!r} is being changed elsewhere; retry")

    async def _lost_commit(self, result: CommitResult, base: Session, key: str, session_id: str) -> Session:
        """What a step decides again from when its commit did not apply: the session as the store has it now."""
        if isinstance(result, LstmServeError):  # ended while computing, or no room for its record
            raise result
        assert isinstance(result, Stale)
        self.metrics.child(self.metrics.commit_conflicts, base.model).inc()
        if result.current.created != base.created:  # ended and created anew while this step computed
            raise SessionNotFound(
                f"session {session_id!r} ended while this step was computing; the id names a new session now"
            )
        return await self._fitting(result.current, key, session_id)

    def _replay(self, session: Session, session_id: str, seq: int, digest: bytes, info: ModelInfo) -> F32:
        """The stored reply of a retried step, or the reason the step cannot be applied."""
        last = session.last_reply(info.state_shape, info.output_size) if seq == session.seq else None
        if last is None:
            raise SequenceMismatch(
                f"seq {seq} is out of order: session {session_id!r} has applied seq {session.seq}, "
                f"the next step must carry seq {session.seq + 1}",
                expected_seq=session.seq + 1,
            )
        last_digest, last_outputs = last
        if digest != last_digest:
            raise SequenceMismatch(
                f"seq {seq} was already applied with different inputs; the next seq is {seq + 1}",
                expected_seq=seq + 1,
                reason="retry_mismatch",
            )
        self.metrics.child(self.metrics.replayed_steps, info.name).inc()
        return last_outputs


def _outcome(result: StepOutcome | BaseException) -> Outcome:
    """A gathered step's outcome; a cancellation is not an outcome, it goes on up."""
    if isinstance(result, BaseException) and not isinstance(result, Exception):
        raise result
    return result
