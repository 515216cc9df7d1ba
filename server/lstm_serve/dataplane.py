"""Everything the service does, without the transport: models, sessions, sequence numbers, batching, metrics.

The gRPC servicer is a thin layer over this class (proto in, proto out); a second transport would be another thin
layer. Raises only the domain errors of lstm_serve.errors.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from lstm_serve import state_blob
from lstm_serve.batching import Batcher
from lstm_serve.coalesce import Coalescer
from lstm_serve.engine.cell import F32
from lstm_serve.engine.forecast import check_forecast_inputs, roll_forward
from lstm_serve.engine.gates import GateTrace
from lstm_serve.engine.model import Model, ModelInfo
from lstm_serve.engine.repository import Repository
from lstm_serve.errors import (
    InvalidInput,
    LimitExceeded,
    LstmServeError,
    ModelNotFound,
    SequenceMismatch,
    SessionNotFound,
    StateMismatch,
    StoreUnavailable,
)
from lstm_serve.keyed_lock import KeyedLock
from lstm_serve.metrics import Metrics
from lstm_serve.sessions import (
    CommitResult,
    EndReason,
    Session,
    SessionStore,
    StepWrite,
    input_digest,
    new_session_id,
    session_key,
)
from lstm_serve.sessions.store import TENANT_NAME as TENANT_NAME  # what a transport may call a tenant
from lstm_serve.sessions.store import LoadResult

# The types of this API, for the transports (which import nothing past this module).
__all__ = [
    "F32",
    "TENANT_NAME",
    "DataPlane",
    "ForecastOutcome",
    "GateTrace",
    "GatedStepOutcome",
    "Limits",
    "ModelInfo",
    "Session",
    "StepOutcome",
]

_T = TypeVar("_T")

MAX_IDLE_TTL = 10 * 365.25 * 86400.0  # ten years; longer is "never" (0), and the reply's Duration must hold it
MAX_COMMIT_ATTEMPTS = 4  # a step recomputed after losing its compare-and-set this often is answered UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Limits:
    max_steps_per_request: int = 4096
    max_batch: int = 64
    max_batch_wait: float = 0.0
    inline_max_parameters: int = 200_000
    inline_max_steps: int = 32
    max_sessions_per_tenant: int = 0  # store-wide; 0 = no limit
    max_forecast_horizon: int = 1024
    bound_session_grace: float = 30.0


@dataclass(frozen=True, slots=True)
class StepOutcome:
    session_id: str
    seq: int
    outputs: F32  # (O,) or (T, O), following the request


@dataclass(frozen=True, slots=True)
class GatedStepOutcome:
    session_id: str
    seq: int
    outputs: F32  # (O,) or (T, O), following the request
    gates: GateTrace | None  # None for a retry answered from the stored reply


@dataclass(frozen=True, slots=True)
class ForecastOutcome:
    outputs: F32  # (N, O)
    inputs: F32  # (N, I), the fed-back columns filled in
    h: F32  # (L, H) after the last step; nothing is committed
    c: F32
    seq: int  # the session's seq the forecast started from (0 for a model's state)


class DataPlane:
    def __init__(
        self,
        repository: Repository,
        store: SessionStore,
        metrics: Metrics,
        limits: Limits = Limits(),
        executor: Executor | None = None,
    ) -> None:
        self.repository = repository
        self.store = store
        self.metrics = metrics
        self.limits = limits
        self._executor = executor
        self._releases: set[asyncio.Task[None]] = set()  # bound sessions waiting out their grace
        self._bindings: Counter[str] = Counter()  # session key -> live streams of this process bound to it
        self._locks = KeyedLock()
        # Small models compute on the event loop (a thread hop would cost more than the step), except long requests;
        # big ones in the executor, so the loop keeps serving while they compute, and the batches grow meanwhile.
        small = {name: m.info.parameters <= limits.inline_max_parameters for name, m in repository.models.items()}
        self._batchers = {
            name: Batcher(
                model,
                max_batch=limits.max_batch,
                max_wait=limits.max_batch_wait,
                executor=executor,
                inline_max_steps=limits.inline_max_steps if small[name] else 0,
                on_batch=metrics.batch_size.labels(model=name).observe,
            )
            for name, model in repository.models.items()
        }
        # one shared, immutable zero state per model: a new or reset session costs no state memory of its own
        self._zero_states = {name: m.zero_state().tobytes() for name, m in repository.models.items()}
        # One store call per loop turn for the commits (and cache misses) of a whole batch: one Redis round trip, not
        # one per session. A store in this process answers at once, so it is called directly.
        self._commit: Callable[[StepWrite], Awaitable[CommitResult]]
        self._read: Callable[[str], Awaitable[LoadResult]]
        if store.shared:
            commits: Coalescer[StepWrite, CommitResult] = Coalescer(store.commit, max_batch=4 * limits.max_batch)
            reads: Coalescer[str, LoadResult] = Coalescer(
                functools.partial(store.load, fresh=False), max_batch=4 * limits.max_batch
            )
            self._coalescers: tuple[Coalescer[Any, Any], ...] = (commits, reads)
            self._commit, self._read = commits.submit, reads.submit
        else:
            self._coalescers = ()
            self._commit, self._read = self._commit_direct, self._read_direct
        metrics.models_loaded.set(len(repository.models))
        metrics.model_load_failures.set(len(repository.failures))
        for name in repository.models:  # every model's series exists from the start, at zero
            metrics.child(metrics.steps, name)

    async def close(self) -> None:
        for release in list(self._releases):
            release.cancel()
        for batcher in self._batchers.values():
            await batcher.close()
        for coalescer in self._coalescers:
            await coalescer.drain()

    async def _commit_direct(self, write: StepWrite) -> CommitResult:
        [result] = await self.store.commit([write])
        return result

    async def _read_direct(self, session_id: str) -> LoadResult:
        [found] = await self.store.load([session_id], fresh=False)
        return found

    # --- models -------------------------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return [m.info for m in self.repository.models.values()]

    def model_failures(self) -> dict[str, str]:
        """Models of the repository that failed to load, with the short reason a client may read (no paths)."""
        return dict(self.repository.failures)

    def model(self, name: str) -> Model:
        model = self.repository.models.get(name)
        if model is None:
            failure = self.repository.failures.get(name)
            if failure is not None:
                raise ModelNotFound(f"model {name!r} failed to load: {failure}")
            known = ", ".join(sorted(self.repository.models)) or "none"
            shown = name if len(name) <= 128 else f"{name[:64]}… ({len(name)} characters)"
            raise ModelNotFound(f"unknown model {shown!r}; served models: {known}")
        return model

    # --- sessions -----------------------------------------------------------------------------------------------
    #
    # Every session method takes the caller's `tenant` (from the transport's authentication; "" on a server without
    # tokens): a tenant's session `id` lives under the store key f"{tenant}/{id}" (sessions.session_key), so a tenant
    # can neither see nor touch another's sessions, and learns nothing of them either: another tenant's id answers
    # exactly as an id that never existed. The sessions returned, and every message, name the client's own id.

    async def create_session(
        self,
        model_name: str,
        session_id: str | None,
        idle_ttl: float | None,
        *,
        tenant: str = "",
        h0: F32 | None = None,
        c0: F32 | None = None,
    ) -> Session:
        """A new session, from the zero state or from `h0` / `c0` ((L, H) each, finite; either may be given)."""
        model = self.model(model_name)  # NOT_FOUND, with the reason, for an unknown or broken model
        given = h0 is not None or c0 is not None
        state = _initial_state(model, h0, c0).tobytes() if given else self._zero_states[model_name]
        return await self._create(model_name, state, session_id, idle_ttl, tenant)

    async def _create(
        self, model_name: str, state: bytes, session_id: str | None, idle_ttl: float | None, tenant: str
    ) -> Session:
        """A new session of `model_name` whose record starts as `state` (seq 0, no stored reply)."""
        if idle_ttl is not None and not 0 <= idle_ttl <= MAX_IDLE_TTL:
            raise InvalidInput(f"idle_ttl must be between 0 (never expire) and {MAX_IDLE_TTL:.0f} s, got {idle_ttl:g}")
        client_id = session_id or new_session_id()
        session = await self.store.create(
            model_name,
            state,
            session_key(tenant, client_id),
            idle_ttl,
            tenant_limit=self.limits.max_sessions_per_tenant,
        )
        self.metrics.sessions_created.labels(model=model_name).inc()
        return _as_seen_by_client(session, client_id)

    async def get_session(self, session_id: str, *, tenant: str = "") -> Session:
        key = session_key(tenant, session_id)
        return _as_seen_by_client(await self._load(key, session_id, fresh=True), session_id)

    async def reset_session(self, session_id: str, *, tenant: str = "") -> Session:
        key = session_key(tenant, session_id)
        await self._locks.acquire(key)  # never between the compute and the commit of a step
        try:
            session = await self._load(key, session_id, fresh=True)
            self.model(session.model)  # NOT_FOUND, with the reason, for a model this server does not serve
            return _as_seen_by_client(await self.store.reset(key, self._zero_states[session.model]), session_id)
        finally:
            self._locks.release(key)

    async def close_session(self, session_id: str, *, tenant: str = "") -> Session:
        key = session_key(tenant, session_id)
        await self._locks.acquire(key)
        try:
            return _as_seen_by_client(await self.store.close(key), session_id)
        finally:
            self._locks.release(key)

    async def sweep(self) -> int:
        """Ends idle-expired sessions and refreshes the live-session gauge from the store (store-wide with Redis)."""
        ended = await self.store.sweep()
        counts = await self.store.counts()
        for name in self.repository.models:
            self.metrics.sessions_active.labels(model=name).set(counts.get(name, 0))
        self.metrics.session_store_bytes.set(await self.store.size_bytes())
        return ended

    async def _load(self, key: str, session_id: str, *, fresh: bool) -> Session:
        """The session under `key` (`session_id` is the client's name for it), checked against its model: a record
        that no longer fits the model's state shape (the model was replaced by another of a different size) ends the
        session with a clear reason instead of being misread."""
        if fresh:
            [found] = await self.store.load([key], fresh=True)
        else:
            found = await self._read(key)
        if isinstance(found, SessionNotFound):
            raise found
        return await self._fitting(found, key, session_id)

    async def _fitting(self, found: Session, key: str, session_id: str) -> Session:
        """`found`, unless its record no longer fits its model's state shape: then the session ends with that reason
        (only this very session: a session re-created meanwhile under the key, of another model, is left alone)."""
        model = self.repository.models.get(found.model)
        if model is not None and not found.fits(model.info.state_shape, model.info.output_size):
            detail = f"(model {found.model!r} changed its state shape to {list(model.info.state_shape)})"
            await self.store.end(key, EndReason.MODEL_CHANGED, detail, model=found.model)
            raise SessionNotFound(f"session {session_id!r} ended: {detail}", EndReason.MODEL_CHANGED.value)
        return found

    # --- steps --------------------------------------------------------------------------------------------------

    async def step(self, session_id: str, seq: int, x: F32, *, tenant: str = "") -> StepOutcome:
        """Applies x ((I,) or (T, I)) as step `seq` of the session, exactly once.

        The session lock keeps this process's steps of one session in order; the store's compare-and-set on the
        record's revision makes check-compute-commit atomic across processes. A session read from a cache may be
        stale: only "this is the next step" is acted on without asking the store, and a step computed from a stale
        record loses its compare-and-set, which hands back the current record to decide again from (typically: the
        step was applied elsewhere, so its stored reply is replayed). The state is replaced only by a commit, so a
        failure or a cancelled call changes nothing.
        """
        key = session_key(tenant, session_id)
        await self._locks.acquire(key)
        try:
            session = await self._load(key, session_id, fresh=False)
            fresh = self.store.authoritative
            checked: ModelInfo | None = None
            for _ in range(MAX_COMMIT_ATTEMPTS):
                info = self.model(session.model).info  # again after every re-read: the id may now name another model
                if info is not checked:
                    xs, single = self._check_inputs(x, info)
                    digest = input_digest(xs)
                    checked = info
                if seq != session.seq + 1:
                    if not fresh:  # a cached record may lag behind the store: look before refusing or replaying
                        session, fresh = await self._load(key, session_id, fresh=True), True
                        continue
                    outputs = self._replay(session, session_id, seq, digest, info)
                    return StepOutcome(session_id, seq, outputs[0] if single else outputs)
                ys, new_state = await self._batchers[info.name].submit(xs, session.state_array(info.state_shape))
                _check_finite(ys, new_state)
                outputs = ys[0] if single else ys
                after = session.stepped(seq, new_state, outputs, digest, self.store.now())
                result = await self._commit(StepWrite(session, after))
                if isinstance(result, Session):
                    self.metrics.child(self.metrics.steps, info.name).inc(len(xs))
                    return StepOutcome(session_id, seq, outputs)
                if isinstance(result, LstmServeError):  # ended while computing, or no room for its record
                    raise result
                self.metrics.child(self.metrics.commit_conflicts, info.name).inc()
                if result.current.created != session.created:  # ended and created anew while this step computed
                    raise SessionNotFound(
                        f"session {session_id!r} ended while this step was computing; the id names a new session now"
                    )
                session, fresh = await self._fitting(result.current, key, session_id), True
            raise StoreUnavailable(f"session {session_id!r} is being changed elsewhere; retry")
        finally:
            self._locks.release(key)

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

    async def predict(self, model_name: str, x: F32, h0: F32 | None, c0: F32 | None) -> tuple[F32, F32, F32]:
        """Stateless run of a whole sequence; returns outputs (T, O) and the final h, c (L, H)."""
        model = self.model(model_name)
        info = model.info
        if x.ndim != 2:
            raise InvalidInput(f"inputs must have shape [T, {info.input_size}], got {list(x.shape)}")
        xs, _ = self._check_inputs(x, info)
        state = _initial_state(model, h0, c0)
        ys, final = await self._batchers[info.name].submit(xs, state)
        _check_finite(ys, final)
        return ys, final[0], final[1]

    # --- issue 13: forecasts, forks, portable state, gates ------------------------------------------------------
    #
    # Separate from the step path above (which stays as it is): these are read-only (forecast, export), create a
    # session like create_session does (fork, import), or branch off before the step path (a step with its gates).

    async def forecast(
        self,
        x: F32,
        *,
        session_id: str | None = None,
        model_name: str | None = None,
        h0: F32 | None = None,
        c0: F32 | None = None,
        tenant: str = "",
    ) -> ForecastOutcome:
        """Rolls a model forward len(x) steps from a session's current state, or from (h0, c0) (zeros by default)
        of `model_name`, feeding the model's declared outputs back as inputs (engine/forecast.py). Commits nothing:
        the session's state and seq are untouched."""
        if (session_id is None) == (model_name is None):
            raise InvalidInput("a forecast names either a session or a model, not both or neither")
        seq = 0
        if session_id is not None:
            if h0 is not None or c0 is not None:
                raise InvalidInput("a forecast from a session starts from its state: h0 and c0 must be unset")
            session = await self._load(session_key(tenant, session_id), session_id, fresh=True)
            model = self.model(session.model)
            state = np.array(session.state_array(model.info.state_shape))
            seq = session.seq
        else:
            assert model_name is not None
            model = self.model(model_name)
            state = _initial_state(model, h0, c0)
        info = model.info
        xs = check_forecast_inputs(x, info.feedback, info.input_size, self.limits.max_forecast_horizon)

        def run_one(x_row: F32, s: F32) -> tuple[F32, F32]:
            [(y, new_state)] = model.run_batch([x_row], [s])
            return y, new_state

        ys, used, final = await self._compute(
            info, len(xs), functools.partial(roll_forward, run_one, xs, state, info.feedback)
        )
        if not (np.isfinite(ys).all() and np.isfinite(final).all()):
            raise InvalidInput("the forecast overflows to Inf or NaN (inputs too large, or the model diverges)")
        return ForecastOutcome(ys, used, final[0], final[1], seq)

    async def _compute(self, info: ModelInfo, steps: int, work: Callable[[], _T]) -> _T:
        """`work` on the event loop when small (as the batcher decides for steps), else in the compute threads."""
        small = info.parameters <= self.limits.inline_max_parameters and steps <= self.limits.inline_max_steps
        if small or self._executor is None:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def fork_session(
        self, session_id: str, new_session_id: str | None, idle_ttl: float | None, *, tenant: str = ""
    ) -> Session:
        """A new session (of the same tenant) starting from `session_id`'s current state, at seq 0."""
        key = session_key(tenant, session_id)
        await self._locks.acquire(key)  # the state of a whole step, never of one half-committed
        try:
            source = await self._load(key, session_id, fresh=True)
        finally:
            self._locks.release(key)
        model = self.model(source.model)
        state = source.state_array(model.info.state_shape).tobytes()
        return await self._create(source.model, state, new_session_id, idle_ttl, tenant)

    async def export_session(self, session_id: str, *, tenant: str = "") -> tuple[bytes, Session]:
        """The session's current state as a blob (state_blob.py) pinned to its model's name, version and weights."""
        key = session_key(tenant, session_id)
        session = await self._load(key, session_id, fresh=True)
        model = self.model(session.model)
        info = model.info
        header = state_blob.BlobHeader(
            model=info.name,
            version=info.version,
            fingerprint=model.fingerprint,
            num_layers=info.num_layers,
            hidden_size=info.hidden_size,
            dtype=state_blob.DTYPE,
            seq=session.seq,
            steps=session.steps,
        )
        blob = state_blob.encode(header, session.state_array(info.state_shape).tobytes())
        return blob, _as_seen_by_client(session, session_id)

    async def import_session(
        self, blob: bytes, session_id: str | None, idle_ttl: float | None, *, tenant: str = ""
    ) -> Session:
        """A new session from an exported blob, refused unless the blob is intact (InvalidInput) and of the very
        model served here under its name (StateMismatch)."""
        header, state = state_blob.decode(blob)
        try:
            model = self.model(header.model)
        except ModelNotFound:
            raise StateMismatch(
                f"the session state is of model {header.model[:128]!r}, which this server does not serve"
            ) from None
        info = model.info
        if (header.num_layers, header.hidden_size) != (info.num_layers, info.hidden_size):
            raise StateMismatch(
                f"the session state has {header.num_layers} layers of {header.hidden_size}; model {info.name!r} "
                f"has {info.num_layers} of {info.hidden_size}"
            )
        if header.fingerprint != model.fingerprint:
            raise StateMismatch(
                f"the session state is of other weights of model {info.name!r} (version {header.version[:64]!r}, "
                f"fingerprint {header.fingerprint[:12]}...; served: version {info.version!r}, "
                f"fingerprint {model.fingerprint[:12]}...)"
            )
        if not np.isfinite(np.frombuffer(state, dtype="<f4")).all():
            raise InvalidInput("the session state contains NaN or Inf")
        return await self._create(info.name, state, session_id, idle_ttl, tenant)

    def bind(self, bound: set[str], session_id: str, *, tenant: str = "") -> None:
        """Binds a session to a stream (`bound`: the stream's sessions) once it has stepped on it."""
        if session_id not in bound:
            bound.add(session_id)
            self._bindings[session_key(tenant, session_id)] += 1

    def release_bound(self, session_ids: set[str], *, tenant: str = "", ended_by_client: bool) -> None:
        """The stream these sessions were bound to has ended. Ended by the client (it half-closed and had every
        reply): they are closed now, unless another stream of this process is bound to them too. Otherwise
        (cancelled, broken, the server draining): after the grace, each one not stepped meanwhile - a client that
        reconnects resends its unanswered steps at once - is closed. Runs in the background; a session already gone
        is no error."""
        grace = 0.0 if ended_by_client else self.limits.bound_session_grace
        for session_id in session_ids:
            key = session_key(tenant, session_id)
            self._bindings[key] -= 1
            if self._bindings[key] <= 0:
                del self._bindings[key]
        task = asyncio.get_running_loop().create_task(self._release(sorted(session_ids), tenant, grace))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, session_ids: list[str], tenant: str, grace: float) -> None:
        seen: dict[str, tuple[int, float]] = {}
        if grace > 0:
            for session_id in session_ids:
                try:
                    session = await self.get_session(session_id, tenant=tenant)
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
                await self.store.close(key)
            except LstmServeError:
                continue  # gone already, or the store is unreachable: its idle TTL ends it
            finally:
                self._locks.release(key)

    async def step_with_gates(self, session_id: str, seq: int, x: F32, *, tenant: str = "") -> GatedStepOutcome:
        """`step`, answering also the cell's internals of every time step (engine/gates.py): the same lock, the same
        decision on seq (a retry replays the stored outputs, without gates: the state they came from is gone), the
        same compare-and-set commit of the served computation's state. The gates come from a second computation
        from the same previous state, paid only here."""
        key = session_key(tenant, session_id)
        await self._locks.acquire(key)
        try:
            session = await self._load(key, session_id, fresh=True)
            for _ in range(MAX_COMMIT_ATTEMPTS):
                model = self.model(session.model)
                info = model.info
                xs, single = self._check_inputs(x, info)
                digest = input_digest(xs)
                if seq != session.seq + 1:
                    outputs = self._replay(session, session_id, seq, digest, info)
                    return GatedStepOutcome(session_id, seq, outputs[0] if single else outputs, None)
                cell = await asyncio.to_thread(model.gate_cell)  # built once; Unsupported before anything runs
                previous = np.array(session.state_array(info.state_shape))
                ys, new_state = await self._batchers[info.name].submit(xs, previous)
                _check_finite(ys, new_state)
                trace = await self._compute(info, len(xs), functools.partial(cell.trace, xs, previous))
                outputs = ys[0] if single else ys
                after = session.stepped(seq, new_state, outputs, digest, self.store.now())
                result = await self._commit(StepWrite(session, after))
                if isinstance(result, Session):
                    self.metrics.child(self.metrics.steps, info.name).inc(len(xs))
                    return GatedStepOutcome(session_id, seq, outputs, trace)
                if isinstance(result, LstmServeError):
                    raise result
                self.metrics.child(self.metrics.commit_conflicts, info.name).inc()
                if result.current.created != session.created:
                    raise SessionNotFound(
                        f"session {session_id!r} ended while this step was computing; the id names a new session now"
                    )
                session = await self._fitting(result.current, key, session_id)
            raise StoreUnavailable(f"session {session_id!r} is being changed elsewhere; retry")
        finally:
            self._locks.release(key)

    def _check_inputs(self, x: F32, info: ModelInfo) -> tuple[F32, bool]:
        """Returns x as (T, I) and whether the request held a single step; raises InvalidInput with the reason."""
        if x.ndim not in (1, 2):
            raise InvalidInput(
                f"inputs must have shape [{info.input_size}] or [T, {info.input_size}], got {list(x.shape)}"
            )
        single = x.ndim == 1
        xs = x.reshape(1, -1) if single else x
        if xs.shape[0] == 0:
            raise InvalidInput("inputs hold no time step (T = 0)")
        if xs.shape[1] != info.input_size:
            raise InvalidInput(
                f"model {info.name!r} takes {info.input_size} input features, got {xs.shape[1]} "
                f"(inputs shape {list(x.shape)})"
            )
        if xs.shape[0] > self.limits.max_steps_per_request:
            raise LimitExceeded(
                f"{xs.shape[0]} time steps in one request; the limit is {self.limits.max_steps_per_request}"
            )
        if not np.isfinite(xs).all():
            bad = np.argwhere(~np.isfinite(xs))[0]
            raise InvalidInput(f"inputs contain NaN or Inf (first at step {bad[0]}, feature {bad[1]})")
        return xs, single


def _initial_state(model: Model, h0: F32 | None, c0: F32 | None) -> F32:
    """A state (2, L, H) from the caller's h0 and c0 ((L, H) each, zeros where not given), checked."""
    state = model.zero_state()
    for i, (name, given) in enumerate((("h0", h0), ("c0", c0))):
        if given is None:
            continue
        if given.shape != state.shape[1:]:
            raise InvalidInput(f"{name} must have shape {list(state.shape[1:])}, got {list(given.shape)}")
        if not np.all(np.isfinite(given)):
            raise InvalidInput(f"{name} contains NaN or Inf")
        state[i] = given
    return state


def _check_finite(outputs: F32, state: F32) -> None:
    """Finite inputs so large that the arithmetic overflows (a sum of +Inf and -Inf terms is NaN) must not become a
    session's state: a NaN state would poison every later step. Refused like any bad input, nothing applied."""
    if not (np.isfinite(state).all() and np.isfinite(outputs).all()):
        raise InvalidInput("inputs too large: the model's arithmetic overflows to Inf or NaN; nothing was applied")


def _as_seen_by_client(session: Session, session_id: str) -> Session:
    """The session named by its client's id rather than its store key."""
    return session if session.id == session_id else replace(session, id=session_id)
