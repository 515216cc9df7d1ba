"""Builds and runs the server: repository, session store, data plane, metrics, and the grpc.aio server with the
standard health and reflection services. Shutdown is graceful: health goes NOT_SERVING, new RPCs are refused, and
in-flight ones get `shutdown_grace` seconds to finish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from threadpoolctl import threadpool_limits

from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_serve.config import Settings
from lstm_serve.dataplane import DataPlane, Limits
from lstm_serve.engine.repository import Repository
from lstm_serve.metrics import Metrics
from lstm_serve.service import LstmServicer
from lstm_serve.sessions import MemorySessionStore

log = logging.getLogger(__name__)

SERVICE_NAME = lstm_pb2.DESCRIPTOR.services_by_name["LstmService"].full_name


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

    @property
    def plane(self) -> DataPlane:
        assert self._plane is not None, "App.start() first"
        return self._plane

    async def start(self) -> None:
        s = self.settings
        # More BLAS threads than cores fight the event loop for the 2 CPUs (see docs/performance.md).
        threadpool_limits(limits=1)
        repository = Repository.scan(s.model_dir, frozenset(s.models))
        store = MemorySessionStore(
            max_sessions=s.max_sessions,
            default_ttl=s.session_ttl,
            ended_ttl=s.ended_session_memory,
            on_end=lambda session, reason: self.metrics.session_ended(session.model, reason.value),
        )
        if s.compute_threads > 0:
            self._executor = ThreadPoolExecutor(s.compute_threads, thread_name_prefix="compute")
        limits = Limits(
            max_steps_per_request=s.max_steps_per_request,
            max_batch=s.max_batch,
            max_batch_wait=s.max_batch_wait,
            inline_max_parameters=s.inline_max_parameters,
        )
        self._plane = DataPlane(repository, store, self.metrics, limits, self._executor)

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
            ],
            maximum_concurrent_rpcs=s.max_concurrent_rpcs,
        )
        lstm_pb2_grpc.add_LstmServiceServicer_to_server(LstmServicer(self._plane), server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        self.port = server.add_insecure_port(f"{s.host}:{s.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {s.host}:{s.port}")
        await server.start()
        self._server = server
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="session-sweeper")

        status = (
            health_pb2.HealthCheckResponse.SERVING if repository.models else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set("", status)
        await self._health.set(SERVICE_NAME, status)
        log.info(
            "serving %d model(s) %s on %s:%d, metrics on %s:%d%s",
            len(repository.models),
            sorted(repository.models),
            s.host,
            self.port,
            s.metrics_host,
            self.metrics_port,
            f"; NOT loaded: {repository.failures}" if repository.failures else "",
        )

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            expired = await self.plane.sweep()
            if expired:
                log.info("expired %d idle session(s)", expired)

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.shutdown_grace if grace is None else grace
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._plane is not None:
            await self._plane.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self.metrics.stop()

    async def run_until_signal(self) -> None:
        """Serves until SIGTERM or SIGINT, then shuts down gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("shutting down: %.1f s for in-flight calls", self.settings.shutdown_grace)
        await self.stop()
        log.info("stopped")
