"""Everything the service does, without the transport: models, sessions, sequence numbers, batching, metrics.

The gRPC servicer is a thin layer over this class (proto in, proto out); a second transport would be another thin
layer. Raises only the domain errors of lstm_serve.errors.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from lstm_serve import state_blob
from lstm_serve.batching import Batcher
from lstm_serve.bound_sessions import StreamBindings
from lstm_serve.coalesce import Coalescer
from lstm_serve.engine.cell import F32
from lstm_serve.engine.forecast import check_forecast_inputs, roll_forward
from lstm_serve.engine.gates import GateTrace
from lstm_serve.engine.model import Model, ModelInfo
from lstm_serve.engine.repository import Repository
from lstm_serve.errors import InvalidInput, ModelNotFound, SessionNotFound, StateMismatch
from lstm_serve.lifecycle import Catalog, ModelLifecycle, Served, Versioning, VersionState, VersionView
from lstm_serve.metrics import Metrics
from lstm_serve.sessions import (
    CommitResult,
    EndReason,
    Session,
    SessionStore,
    StepWrite,
    new_session_id,
    session_key,
)
from lstm_serve.sessions.store import MAX_SESSION_ID_CHARS, LoadResult
from lstm_serve.sessions.store import TENANT_NAME as TENANT_NAME  # what a transport may call a tenant
from lstm_serve.stepping import OVERFLOW, StepItem, StepOutcome, Stepper, check_finite, shape_inputs

# The types of this API, for the transports (which import nothing past this module).
__all__ = [
    "F32",
    "TENANT_NAME",
    "DataPlane",
    "ForecastOutcome",
    "GateTrace",
    "Limits",
    "ModelInfo",
    "Session",
    "SessionLimits",
    "StepItem",
    "StepOutcome",
    "VersionState",
    "VersionView",
]

_T = TypeVar("_T")

MAX_IDLE_TTL = 10 * 365.25 * 86400.0  # ten years; longer is "never" (0), and the reply's Duration must hold it


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
class SessionLimits:
    """What a client must respect about sessions, as this data plane and its store enforce it (GetServerInfo)."""

    max_sessions: int  # live sessions, store-wide
    max_sessions_policy: str  # "evict" or "refuse", at max_sessions
    max_sessions_per_tenant: int  # 0 = no limit
    default_idle_ttl: float  # seconds, for a session created without one; 0 = no idle expiry
    max_idle_ttl: float  # seconds, the longest idle TTL a client may ask for
    max_session_id_chars: int  # a client-chosen id: 1 to this many characters of [A-Za-z0-9._:-]
    max_steps_per_request: int


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
        versioning: Versioning | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.limits = limits
        self.versioning = versioning = versioning or Versioning()
        self._executor = executor
        # Every served version of every model, its batcher and its zero state (one shared, immutable zero state per
        # version: a new or reset session costs no state memory of its own). Reloads change it (lifecycle.py).
        self.catalog = Catalog(self._batcher_for, versioning.drain_timeout)
        for versions in repository.versions.values():
            for model in versions.values():
                self.catalog.add(model)
        self.catalog.failures = dict(repository.failures)
        self._batchers = self.catalog.batchers  # the step path's lookup, by ModelInfo.key
        self.lifecycle = ModelLifecycle(self.catalog, store, versioning, on_change=self._count_models)
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
        self._stepper = Stepper(
            self.model,
            store,
            self._batchers,
            metrics,
            max_steps=limits.max_steps_per_request,
            inline_max_steps=limits.inline_max_steps,
            max_wait=limits.max_batch_wait,
            max_batch=limits.max_batch,
            load=self._load,
            fitting=self._fitting,
            commit=self._commit,
            offload=self._compute,
        )
        self._locks = self._stepper.locks  # create, reset and close take a session's lock too
        self._bound = StreamBindings(store, self._locks, self._load, limits.bound_session_grace)
        self._count_models()

    def _batcher_for(self, model: Model) -> Batcher:
        # Small models compute on the event loop (a thread hop would cost more than the step), except long requests;
        # big ones in the executor, so the loop keeps serving while they compute, and the batches grow meanwhile.
        small = model.info.parameters <= self.limits.inline_max_parameters
        return Batcher(
            model,
            max_batch=self.limits.max_batch,
            executor=self._executor,
            inline_max_steps=self.limits.inline_max_steps if small else 0,
            on_batch=self.metrics.batch_size.labels(model=model.info.name).observe,
        )

    def _count_models(self) -> None:
        self.metrics.models_loaded.set(len(self.catalog.versions))
        self.metrics.model_load_failures.set(len(self.catalog.failures))
        for name in self.catalog.versions:  # every model's series exists from the start, at zero
            self.metrics.child(self.metrics.steps, name)

    async def close(self) -> None:
        self._bound.cancel()
        await self._stepper.close()
        await self.catalog.close()
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
        """Every version served (ready or draining), by name then version."""
        return [s.model.info for s in self.catalog.all()]

    def model_versions(self) -> list[VersionView]:
        """Every version served, with its state and whether it is the one new sessions get."""
        views = []
        for name in sorted(self.catalog.versions):
            latest = self.catalog.latest(name)
            views += [VersionView(s.model.info, s.state, s is latest) for s in self.catalog.versions[name].values()]
        return views

    def model_failures(self) -> dict[str, str]:
        """Models (or versions: "name/version") of the repository that failed to load, with the short reason a
        client may read (no paths)."""
        return dict(self.catalog.failures)

    def model(self, name: str, version: int | None = None) -> Model:
        """The latest ready version of `name` (what new sessions get), or the given version while it is served
        (ready, or draining for the sessions pinned to it)."""
        return self._served(name, version).model

    def _served(self, name: str, version: int | None = None) -> Served:
        served = self.catalog.latest(name) if version is None else self.catalog.get(name, version)
        if served is not None:
            return served
        shown = name if len(name) <= 128 else f"{name[:64]}… ({len(name)} characters)"
        versions = self.catalog.versions.get(name)
        if versions:
            offered = [v for v, s in versions.items() if s.state is VersionState.READY]
            raise ModelNotFound(f"model {shown!r} has no version {version} served; ready versions: {offered}")
        failure = self.catalog.failures.get(name)
        if failure is not None:
            raise ModelNotFound(f"model {name!r} failed to load: {failure}")
        known = ", ".join(sorted(self.catalog.versions)) or "none"
        raise ModelNotFound(f"unknown model {shown!r}; served models: {known}")

    async def reload_models(self) -> list[str]:
        """Reads the repository again and swaps in what changed; returns the changes in words (lifecycle.py)."""
        return await self.lifecycle.reload()

    async def load_model(self, name: str, version: int = 0) -> list[str]:
        """An operator's load: a model unloaded before serves again (by its policy), or `version` is served beside
        the policy's versions."""
        changes = await self.lifecycle.load(name, version)
        if name not in self.catalog.versions or (version and self.catalog.get(name, version) is None):
            what = f"model {name!r}" + (f" version {version}" if version else "")
            reasons = {k: v for k, v in self.catalog.failures.items() if k == name or k.startswith(f"{name}/")}
            raise ModelNotFound(f"{what} could not be loaded: {reasons or 'not in the repository'}")
        return changes

    async def unload_model(self, name: str, version: int = 0) -> list[str]:
        """An operator's unload: the model (or one version) is retired, its sessions drain (lifecycle.py)."""
        if name not in self.catalog.versions or (version and self.catalog.get(name, version) is None):
            self._served(name, version or None)  # NOT_FOUND with the reason
        return await self.lifecycle.unload(name, version)

    async def retire_due(self) -> int:
        """Drops the retired versions nobody needs any more (lifecycle.py)."""
        return await self.lifecycle.retire_due()

    def session_limits(self) -> SessionLimits:
        return SessionLimits(
            max_sessions=self.store.max_sessions,
            max_sessions_policy=self.store.policy.value,
            max_sessions_per_tenant=self.limits.max_sessions_per_tenant,
            default_idle_ttl=self.store.default_ttl,
            max_idle_ttl=MAX_IDLE_TTL,
            max_session_id_chars=MAX_SESSION_ID_CHARS,
            max_steps_per_request=self.limits.max_steps_per_request,
        )

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
        version: int | None = None,
        h0: F32 | None = None,
        c0: F32 | None = None,
    ) -> Session:
        """A new session, pinned to `version` (None: the latest ready version) for its whole life, from the zero
        state or from `h0` / `c0` ((L, H) each, finite; either may be given)."""
        served = self._served(model_name, version)  # NOT_FOUND, with the reason, for an unknown or broken model
        if served.state is not VersionState.READY:
            raise ModelNotFound(f"model {model_name!r} version {version} is retired: it takes no new sessions")
        given = h0 is not None or c0 is not None
        state = _initial_state(served.model, h0, c0).tobytes() if given else served.zero_state
        return await self._create(served.model.info, state, session_id, idle_ttl, tenant)

    async def _create(
        self, info: ModelInfo, state: bytes, session_id: str | None, idle_ttl: float | None, tenant: str
    ) -> Session:
        """A new session of model version `info` whose record starts as `state` (seq 0, no stored reply)."""
        if idle_ttl is not None and not 0 <= idle_ttl <= MAX_IDLE_TTL:
            raise InvalidInput(
                f"idle_ttl must be between 0 (never expire) and {MAX_IDLE_TTL:.0f} s, got {idle_ttl:g}", "idle_ttl"
            )
        client_id = session_id or new_session_id()
        session = await self.store.create(
            info.name,
            state,
            session_key(tenant, client_id),
            idle_ttl,
            tenant_limit=self.limits.max_sessions_per_tenant,
            version=info.version,
        )
        self.metrics.sessions_created.labels(model=info.name).inc()
        return _as_seen_by_client(session, client_id)

    async def get_session(self, session_id: str, *, tenant: str = "") -> Session:
        key = session_key(tenant, session_id)
        return _as_seen_by_client(await self._load(key, session_id, fresh=True), session_id)

    async def reset_session(self, session_id: str, *, tenant: str = "") -> Session:
        key = session_key(tenant, session_id)
        await self._locks.acquire(key)  # never between the compute and the commit of a step
        try:
            session = await self._load(key, session_id, fresh=True)
            # NOT_FOUND, with the reason, for a model this server does not serve
            zero_state = self._served(session.model, session.version).zero_state
            return _as_seen_by_client(await self.store.reset(key, zero_state), session_id)
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
        await self.retire_due()
        counts = await self.store.counts()
        for name in self.catalog.versions:
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
        """`found`, unless its record no longer fits its model's state shape (then the session ends with that
        reason), or the version it is pinned to was retired and dropped here (then it ends as `model_retired`).
        Only this very session: a session re-created meanwhile under the key, of another model, is left alone."""
        served = self.catalog.get(found.model, found.version)
        pin = (found.model, found.version)
        if served is None and (found.model in self.catalog.versions or pin in self.catalog.retired):
            served = await self.lifecycle.adopt(found.model, found.version)
            if served is None:
                detail = f"(model {found.model!r} version {found.version} was retired)"
                await self.store.end(key, EndReason.MODEL_RETIRED, detail, model=found.model)
                raise SessionNotFound(f"session {session_id!r} ended: {detail}", EndReason.MODEL_RETIRED.value)
        model = served.model if served is not None else None
        if model is not None and not found.fits(model.info.state_shape, model.info.output_size):
            detail = f"(model {found.model!r} changed its state shape to {list(model.info.state_shape)})"
            await self.store.end(key, EndReason.MODEL_CHANGED, detail, model=found.model)
            raise SessionNotFound(f"session {session_id!r} ended: {detail}", EndReason.MODEL_CHANGED.value)
        return found

    # --- steps --------------------------------------------------------------------------------------------------

    async def step(self, session_id: str, seq: int, x: F32, *, tenant: str = "") -> StepOutcome:
        """Applies x ((I,) or (T, I)) as step `seq` of the session, exactly once, batched with the other steps of
        this loop turn (stepping.py)."""
        return await self._stepper.submit(StepItem(session_id, seq, x), tenant)

    def submit_step(self, session_id: str, seq: int, x: F32, *, tenant: str = "") -> asyncio.Future[StepOutcome]:
        """`step` as a future, for a transport that answers from its callback (a stream: no task per request)."""
        return self._stepper.submit(StepItem(session_id, seq, x), tenant)

    async def step_many(self, items: Sequence[StepItem], *, tenant: str = "") -> list[StepOutcome | Exception]:
        """Steps of many sessions that came in one message: each exactly once, each answered on its own (its
        outcome, or the error that refused it; an exception that is not an LstmServeError is a bug, for the
        transport to report as internal). Raises LimitExceeded for a message of too many time steps in all."""
        return await self._stepper.step_many(items, tenant)

    async def predict(self, model_name: str, x: F32, h0: F32 | None, c0: F32 | None) -> tuple[F32, F32, F32]:
        """Stateless run of a whole sequence; returns outputs (T, O) and the final h, c (L, H)."""
        model = self.model(model_name)
        info = model.info
        if x.ndim != 2:
            raise InvalidInput(f"inputs must have shape [T, {info.input_size}], got {list(x.shape)}", "inputs")
        xs, _ = shape_inputs(x, info, self.limits.max_steps_per_request)
        check_finite(xs)
        state = _initial_state(model, h0, c0)
        ys, final, finite = await self._batchers[info.key].submit(xs, state)
        if not finite:
            raise InvalidInput(OVERFLOW, "inputs")
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
            model = self.model(session.model, session.version)
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
        model = self.model(source.model, source.version)  # the fork is pinned to its source's version
        state = source.state_array(model.info.state_shape).tobytes()
        return await self._create(model.info, state, new_session_id, idle_ttl, tenant)

    async def export_session(self, session_id: str, *, tenant: str = "") -> tuple[bytes, Session]:
        """The session's current state as a blob (state_blob.py) pinned to its model's name, version and weights."""
        key = session_key(tenant, session_id)
        session = await self._load(key, session_id, fresh=True)
        model = self.model(session.model, session.version)
        info = model.info
        header = state_blob.BlobHeader(
            model=info.name,
            version=str(info.version),
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
        try:  # the blob's version where it is served here, else the latest: the fingerprint decides
            pinned = int(header.version) if header.version.isdigit() and len(header.version) < 10 else None
            served = self.catalog.get(header.model, pinned) if pinned is not None else None
            model = served.model if served is not None else self.model(header.model)
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
        return await self._create(info, state, session_id, idle_ttl, tenant)

    def bind(self, bound: set[str], session_id: str, *, tenant: str = "") -> None:
        """Binds a session to a stream once it has stepped on it (bound_sessions.py)."""
        self._bound.bind(bound, session_id, tenant)

    def release_bound(self, session_ids: set[str], *, tenant: str = "", ended_by_client: bool) -> None:
        """The stream these sessions were bound to has ended: they are closed, now or after the grace."""
        self._bound.release(session_ids, tenant, ended_by_client)

    async def step_with_gates(self, session_id: str, seq: int, x: F32, *, tenant: str = "") -> StepOutcome:
        """`step`, answering also the cell's internals (StepOutcome.gates; stepping.py)."""
        return await self._stepper.step_with_gates(StepItem(session_id, seq, x), tenant)


def _initial_state(model: Model, h0: F32 | None, c0: F32 | None) -> F32:
    """A state (2, L, H) from the caller's h0 and c0 ((L, H) each, zeros where not given), checked."""
    state = model.zero_state()
    for i, (name, given) in enumerate((("h0", h0), ("c0", c0))):
        if given is None:
            continue
        if given.shape != state.shape[1:]:
            raise InvalidInput(f"{name} must have shape {list(state.shape[1:])}, got {list(given.shape)}", name)
        if not np.all(np.isfinite(given)):
            raise InvalidInput(f"{name} contains NaN or Inf", name)
        state[i] = given
    return state


def _as_seen_by_client(session: Session, session_id: str) -> Session:
    """The session named by its client's id rather than its store key."""
    return session if session.id == session_id else replace(session, id=session_id)
