"""Builds and runs the server: repository, session store, data plane, metrics, and the grpc.aio server with the
standard health and reflection services. Shutdown is graceful: health goes NOT_SERVING, new RPCs are refused, and
in-flight ones get `shutdown_grace` seconds to finish; then the memory store's snapshot is written, if asked for.

Health has two names: "" is liveness (the process runs: an orchestrator restarts it when this fails), and
`lstm.v1.LstmService` is readiness (models loaded and the session store reachable: a load balancer sends traffic only
while it holds). A Redis outage makes every replica unready, never dead, so nothing restarts them in a loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from threadpoolctl import threadpool_limits

from lstm_client._proto.lstm.v1 import lstm_pb2
from lstm_serve.config import Settings
from lstm_serve.dataplane import DataPlane, Limits
from lstm_serve.engine import repository as repo
from lstm_serve.engine.repository import Repository, VersionPolicy
from lstm_serve.errors import StoreUnavailable
from lstm_serve.lifecycle import Versioning
from lstm_serve.metrics import Metrics
from lstm_serve.oip import OipServicer
from lstm_serve.oip.servicer import SERVICE as OIP_SERVICE_NAME
from lstm_serve.service import CallLimits, Calls, LstmServicer
from lstm_serve.service.admin import SERVICE as ADMIN_SERVICE
from lstm_serve.service.admin import AdminServicer
from lstm_serve.service.auth import AuthInterceptor, TokenFileError, Tokens
from lstm_serve.service.tls import CertificateFiles, TlsError
from lstm_serve.sessions import CapacityPolicy, EndReason, MemorySessionStore, SessionStore
from lstm_serve.sessions import snapshot as snapshots
from lstm_serve.sessions.memory import Ended
from lstm_serve.sessions.redis_store import RedisSessionStore

log = logging.getLogger(__name__)

SERVICE_NAME = lstm_pb2.DESCRIPTOR.services_by_name["LstmService"].full_name
T = TypeVar("T")
STORE_CHECK_INTERVAL = 1.0  # seconds between readiness probes of a shared store
DRAIN_LINGER = 0.25  # seconds the port stays open after the drain, answering UNAVAILABLE
LAG_SAMPLE_INTERVAL = 0.25  # seconds between two samples of the event loop's lag (lstm_event_loop_lag_seconds)


class StartupError(Exception):
    """The server cannot start; the message is the one line an operator needs (no traceback)."""


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Runs `fn` in a daemon thread: the event loop stays free to take SIGTERM while models load, and a load stuck in
    a system call (a file that never ends) does not keep the process from exiting."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable[[Any], object], value: object) -> None:
        if not future.done():
            setter(value)

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task, which raises it
            outcome: tuple[Callable[[Any], object], object] = (future.set_exception, exc)
        else:
            outcome = (future.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name="load-models", daemon=True).start()
    return await future


class App:
    """One server instance. `start()` returns once it accepts calls; `port` and `metrics_port` are then bound."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self._plane: DataPlane | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._model_watch: asyncio.Task[None] | None = None
        self._models_seen: tuple[object, ...] = ()  # the repository's fingerprint the watch compares with
        self._lag_watch: asyncio.Task[None] | None = None
        self._model_health: set[str] = set()
        self._snapshotter: asyncio.Task[None] | None = None
        self._snapshot_writing: asyncio.Future[int] | None = None  # a periodic write in its thread
        self._calls: Calls | None = None
        self._store: SessionStore | None = None
        self._ready: bool | None = None
        self._store_reachable = True

    @property
    def plane(self) -> DataPlane:
        assert self._plane is not None, "App.start() first"
        return self._plane

    async def start(self) -> None:
        s = self.settings
        # More BLAS threads than cores fight the event loop for the 2 CPUs (see docs/performance.md).
        threadpool_limits(limits=1)
        tokens, credentials = self._tokens(), self._credentials()  # before the (slow) models: a bad file stops at once
        admin_tokens = self._admin_tokens()
        policy = VersionPolicy.parse(s.version_policy)
        if s.model_poll_interval > 0:  # taken before the scan: a version written while it reads is a change to see
            self._models_seen = await _in_daemon_thread(repo.tree_fingerprint, s.model_dir)
        repository = await _in_daemon_thread(Repository.scan, s.model_dir, frozenset(s.models), policy)
        store = self._store = self._build_store()
        if s.snapshot is not None and isinstance(store, MemorySessionStore):
            self._restore(store, repository)
        if s.compute_threads > 0:
            self._executor = ThreadPoolExecutor(s.compute_threads, thread_name_prefix="compute")
        limits = Limits(
            max_steps_per_request=s.max_steps_per_request,
            max_batch=s.max_batch,
            max_batch_wait=s.max_batch_wait,
            inline_max_parameters=s.inline_max_parameters,
            inline_max_steps=s.inline_max_steps,
            max_sessions_per_tenant=s.max_sessions_per_tenant,
            max_forecast_horizon=s.max_forecast_horizon,
            bound_session_grace=s.bound_session_grace,
        )
        versioning = Versioning(s.model_dir, tuple(s.models), policy, s.version_drain_timeout)
        self._plane = DataPlane(repository, store, self.metrics, limits, self._executor, versioning)

        call_limits = CallLimits(
            s.max_concurrent_rpcs,
            s.max_calls_per_peer,
            s.stream_idle_timeout,
            s.tenant_rate,
            s.tenant_burst,
            max_message_bytes=s.max_message_bytes,
        )
        self._calls = Calls(self.metrics, call_limits)  # the gate of lstm.v1 calls; health is outside it
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(tokens, self._calls, admin_tokens)]
            if tokens is not None or admin_tokens is not None
            else [],
            options=[
                ("grpc.max_receive_message_length", call_limits.max_message_bytes),
                ("grpc.max_send_message_length", call_limits.max_message_bytes),
                # grpcio shares ports by default; only workers over a shared store may (else sessions go missing)
                ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
            ],
        )
        self._server = server  # stopped by stop() even if it never starts
        LstmServicer(self._plane, self._calls).register(server)
        services = [SERVICE_NAME, ADMIN_SERVICE]
        if s.oip:  # the Open Inference Protocol on the same port, through the same gate
            OipServicer(self._plane, self._calls, ready=lambda: bool(self._ready)).register(server)
            services.append(OIP_SERVICE_NAME)
        AdminServicer(
            self._plane, self._calls, admin_configured=admin_tokens is not None, loopback=s.admin_loopback
        ).register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        try:
            if credentials is not None:
                self.port = server.add_secure_port(f"{s.host}:{s.port}", credentials)
            else:
                self.port = server.add_insecure_port(f"{s.host}:{s.port}")
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise StartupError(f"cannot listen on {s.host}:{s.port}: the address is in use or not available here")
        await server.start()
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="session-sweeper")
        self._lag_watch = asyncio.create_task(self._watch_loop_lag(), name="loop-lag-watch")
        if s.snapshot is not None and s.snapshot_interval > 0:
            self._snapshotter = asyncio.create_task(self._snapshot_forever(), name="snapshot-writer")

        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._check_store()
        with contextlib.suppress(StoreUnavailable):
            await self.plane.sweep()  # the live-session gauge from the start
        if store.shared:
            self._watcher = asyncio.create_task(self._watch_store(), name="store-watcher")
        await self._set_model_health()
        if s.model_poll_interval > 0:
            self._model_watch = asyncio.create_task(self._watch_models(), name="model-watcher")
        log.info(
            "serving %d model(s) %s on %s:%d%s, metrics %s; sessions in %s%s",
            len(repository.models),
            sorted(repository.models),
            s.host,
            self.port,
            _security(s, tokens),
            f"on {s.metrics_host}:{self.metrics_port}" if s.metrics_port >= 0 else "off",
            "memory" if not store.shared else s.store.split("@")[-1],  # never log a password in the URL
            f"; NOT loaded: {repository.failures}" if repository.failures else "",
        )

    def _tokens(self) -> Tokens | None:
        s = self.settings
        if not s.authenticated:
            return None
        try:
            tokens = Tokens(s.tokens_file, s.tokens)
        except TokenFileError as exc:
            raise StartupError(str(exc)) from None
        if not len(tokens):
            log.warning("no tokens in %s: every lstm.v1 call will be refused UNAUTHENTICATED", s.tokens_file)
        if s.tls_cert is None and s.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("bearer tokens without TLS (--tls-cert): tokens cross the network in clear text")
        return tokens

    def _admin_tokens(self) -> Tokens | None:
        path = self.settings.admin_tokens_file
        if path is None:
            return None
        try:
            return Tokens(path)
        except TokenFileError as exc:
            raise StartupError(str(exc)) from None

    async def _set_model_health(self) -> None:
        """Health per model, under "lstm.v1.LstmService/<model>": SERVING while a version of it is ready."""
        versions = self.plane.model_versions()
        self.metrics.models_served([(v.info.name, v.info.version, v.info.backend, str(v.state)) for v in versions])
        ready = {v.info.name for v in versions if v.latest}
        for name in ready | self._model_health:
            status = (
                health_pb2.HealthCheckResponse.SERVING if name in ready else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await self._health.set(f"{SERVICE_NAME}/{name}", status)
        self._model_health |= ready

    async def _watch_models(self) -> None:
        """Polls the repository (names, mtimes, sizes; no file opened) and reloads when it changed. Every worker
        process runs its own watch, so they all pick up the same versions (see docs/operations.md)."""
        root = self.settings.model_dir
        loop = asyncio.get_running_loop()
        seen = self._models_seen  # as the repository was before the start's scan
        while True:
            await asyncio.sleep(self.settings.model_poll_interval)
            try:
                now = await loop.run_in_executor(None, repo.tree_fingerprint, root)
                if now != seen:
                    seen = now
                    await self.plane.reload_models()
                else:
                    await self.plane.retire_due()
                await self._set_model_health()
            except Exception:  # a bug or a racing rename must not end the watch for good
                log.exception("reloading the models failed")

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        try:
            return CertificateFiles(s.tls_cert, s.tls_key, s.tls_client_ca).credentials()
        except TlsError as exc:
            raise StartupError(str(exc)) from None

    def _build_store(self) -> SessionStore:
        s = self.settings
        on_end = self.metrics.session_ended
        policy = CapacityPolicy(s.max_sessions_policy)
        if s.store == "memory":
            return MemorySessionStore(
                max_sessions=s.max_sessions,
                default_ttl=s.session_ttl,
                policy=policy,
                max_bytes=s.max_session_bytes,
                ended_ttl=s.ended_session_memory,
                on_end=on_end,
            )
        return RedisSessionStore(
            s.store,
            max_sessions=s.max_sessions,
            default_ttl=s.session_ttl,
            policy=policy,
            ended_ttl=s.ended_session_memory,
            prefix=s.store_prefix,
            timeout=s.store_timeout,
            cache_bytes=s.max_session_bytes,
            on_end=on_end,
            on_call=self.metrics.store_call,
        )

    def _restore(self, store: MemorySessionStore, repository: Repository) -> None:
        """Loads the snapshot, if there is one; sessions of a model whose state shape changed end with that reason."""
        path = self.settings.snapshot
        assert path is not None
        try:  # a snapshot that cannot be written must stop the start, not be found out at shutdown
            snapshots.check_writable(path)
        except OSError as exc:
            raise StartupError(f"cannot write the snapshot {path}: {exc.strerror or exc}") from None
        if not path.exists():
            log.info("no snapshot at %s yet: starting without sessions", path)
            return
        try:
            snap = snapshots.read(path)
        except snapshots.SnapshotError as exc:
            raise StartupError(str(exc)) from None
        keep, ended = [], list(snap.ended)
        for session in snap.sessions:
            versions = repository.versions.get(session.model, {})
            model = versions.get(session.version)
            was = snap.models.get((session.model, session.version))
            now = (list(model.info.state_shape), model.info.output_size) if model is not None else None
            if model is not None and now != was:
                detail = f"(model {session.model!r} changed its state shape from {was} to {now} across a restart)"
                ended.append((session.id, Ended(EndReason.MODEL_CHANGED, snap.written, detail)))
            else:
                keep.append(session)
        store.restore(keep, ended)
        log.info(
            "restored %d session(s) from %s (written %.0f s ago)%s",
            len(keep),
            path,
            max(0.0, time.time() - snap.written),
            f"; {len(snap.sessions) - len(keep)} ended: their model changed shape"
            if len(keep) < len(snap.sessions)
            else "",
        )

    async def _check_store(self) -> None:
        """Readiness follows the store: a replica that cannot reach Redis takes no new traffic, but stays alive."""
        try:
            await self.plane.store.ping()
            reachable = True
        except StoreUnavailable as exc:
            reachable = False
            if self._store_reachable:
                log.warning("session store unreachable, readiness NOT_SERVING: %s", exc.message)
        if reachable and not self._store_reachable:
            log.info("session store reachable again")
        self._store_reachable = reachable
        self.metrics.store_up.set(1 if reachable else 0)
        ready = reachable and bool(self.plane.catalog.versions)
        if ready != self._ready:
            self._ready = ready
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            await self._health.set(SERVICE_NAME, status)

    async def _watch_store(self) -> None:
        while True:
            await asyncio.sleep(STORE_CHECK_INTERVAL)
            try:
                await self._check_store()
            except Exception:  # a bug or an unexpected store error must not end the watch for good
                log.exception("checking the session store failed")

    async def _watch_loop_lag(self) -> None:
        """How late the event loop wakes a timer: every request, unary or in a stream, waits that long before any of
        its code runs, and no per-request timer sees it (they start when the request's code does). Rises with
        overload long before the loop stops answering. The call gauges are sampled here too."""
        loop = asyncio.get_running_loop()
        observe, sample = self.metrics.loop_lag.observe, self.metrics.sample
        while True:
            due = loop.time() + LAG_SAMPLE_INTERVAL
            await asyncio.sleep(LAG_SAMPLE_INTERVAL)
            observe(max(0.0, loop.time() - due))
            sample()  # the call gauges, at the same pace

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            if self._calls is not None and (idle := self._calls.end_idle_streams()):
                log.info("ended %d stream(s) idle for over %g s", idle, self.settings.stream_idle_timeout)
            try:
                expired = await self.plane.sweep()
                await self._set_model_health()
            except StoreUnavailable:
                continue  # the store watcher reports the outage; the next sweep catches up
            except Exception:  # a bug or an unexpected store error must not end sweeping for good
                log.exception("sweeping idle sessions failed")
                continue
            if expired:
                log.info("expired %d idle session(s)", expired)

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.shutdown_grace if grace is None else grace
        await self._health.enter_graceful_shutdown()  # NOT_SERVING first: balancers stop sending here
        # new calls UNAVAILABLE, streams told to reconnect, calls in progress answered
        if self._calls is not None:
            started = time.monotonic()
            if not await self._calls.drain(grace):
                log.warning("calls still in progress after %.1f s; they are cancelled", grace)
            # a moment more of answering UNAVAILABLE, for calls already on their way: closing the port on them
            # would cancel them (CANCELLED, which clients do not retry) instead
            await asyncio.sleep(max(0.0, min(DRAIN_LINGER, grace - (time.monotonic() - started))))
        if self._server is not None:
            await self._server.stop(0.5)
        for task in (self._sweeper, self._watcher, self._snapshotter, self._model_watch, self._lag_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):  # nothing may cost the snapshot
                    await task
        if self._plane is not None:
            await self._plane.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._snapshot_writing is not None:  # let a periodic write finish before the last one
            with contextlib.suppress(Exception):
                await self._snapshot_writing
        self._write_snapshot()
        if self._store is not None:
            await self._store.aclose()
        self.metrics.stop()

    async def _snapshot_forever(self) -> None:
        """Writes the snapshot every --snapshot-interval, in a thread (the loop only copies two lists), so that a
        crash loses at most that interval: sessions then roll back to it, as after a Redis crash with AOF everysec."""
        path, store = self.settings.snapshot, self._store
        assert path is not None
        assert isinstance(store, MemorySessionStore)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.snapshot_interval)
            live, ended, models = store.live(), store.ended(), self.plane.models()
            self._snapshot_writing = loop.run_in_executor(None, snapshots.write, path, live, ended, models)
            try:
                size = await asyncio.shield(self._snapshot_writing)
            except Exception as exc:  # a full disk, or a bug: log it, keep serving, try again next time
                log.error("could not write the snapshot %s: %s", path, exc)
                continue
            log.debug("wrote %d session(s) to %s (%d bytes)", len(live), path, size)

    def _write_snapshot(self) -> None:
        path = self.settings.snapshot
        if path is None or not isinstance(self._store, MemorySessionStore) or self._plane is None:
            return
        store = self._store
        try:
            size = snapshots.write(path, store.live(), store.ended(), self._plane.models())
        except OSError as exc:
            log.error("could not write the snapshot %s: %s; the sessions are lost", path, exc)
            return
        log.info("wrote %d session(s) to %s (%d bytes)", len(store), path, size)

    async def run_until_signal(self, on_started: Callable[[], object] | None = None) -> None:
        """Serves until SIGTERM or SIGINT, then shuts down gracefully. The handlers are set before the (possibly slow)
        start, so a signal during loading stops the server too."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        starting = asyncio.create_task(self.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait((starting, stopped), return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("stop requested while starting")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartupError):
                await starting
            await self.stop(grace=0)
            return
        stopped.cancel()
        try:
            starting.result()
        except BaseException:
            await self.stop(grace=0)
            raise
        if on_started is not None:
            on_started()
        await stop.wait()
        log.info("shutting down: %.1f s for in-flight calls", self.settings.shutdown_grace)
        await self.stop()
        log.info("stopped")


def _security(s: Settings, tokens: Tokens | None) -> str:
    """ " (mutual TLS, tokens of 3 tenants)" for the start-up line."""
    parts = []
    if s.tls_cert is not None:
        parts.append("mutual TLS" if s.tls_client_ca is not None else "TLS")
    if tokens is not None:
        parts.append(f"tokens of {len(tokens.tenants)} tenant(s)")
    return f" ({', '.join(parts)})" if parts else ""
