"""`--workers N`: N server processes on one port, for N cores.

Python serves one core per process, so more cores need more processes. Each worker is a whole server (its own event
loop, batchers and health service) bound to the same port with SO_REUSEPORT, and the kernel spreads connections over
them. That is only correct with a shared session store: a session created through one worker must be found through
any other (config.Settings refuses workers > 1 with the memory store).

The parent process holds no sessions and serves no gRPC. It reserves the port, starts the workers (spawned, not
forked: gRPC and forking do not mix), restarts a worker that dies, serves /metrics merged over the workers
(prometheus-client's multiprocess mode), and on SIGTERM/SIGINT lets every worker drain before it exits.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any

from lstm_serve.config import Settings

log = logging.getLogger(__name__)

RESTART_LIMIT = 5  # worker deaths within RESTART_WINDOW after which the parent gives up (a crash loop, not bad luck)
RESTART_WINDOW = 60.0
START_TIMEOUT = 120.0


def _worker_main(values: dict[str, Any], index: int, started: Any) -> None:
    """Runs in the spawned process: one ordinary server on the shared port."""
    import asyncio

    from lstm_serve import logs
    from lstm_serve.app import App, StartupError

    settings = Settings(**values)
    logs.configure(settings.log_level, settings.log_json)
    app = App(settings)
    try:
        asyncio.run(app.run_until_signal(on_started=lambda: started.put((index, os.getpid()))))
    except StartupError as exc:
        log.error("worker %d cannot start: %s", index, exc)
        raise SystemExit(2) from None


def _reserve_port(host: str, port: int) -> socket.socket:
    """Binds host:port with SO_REUSEPORT without listening: the port is ours (port 0 picks one) and the workers can
    bind it too; nothing is accepted on this socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ctx = multiprocessing.get_context("spawn")
        self._started: Any = self._ctx.Queue()
        self._workers: dict[int, BaseProcess] = {}
        self._deaths: list[float] = []
        self._stopping = threading.Event()
        self._metrics_dir = ""

    def run(self) -> int:
        s = self.settings
        reserved = _reserve_port(s.host, s.port)
        port = reserved.getsockname()[1]
        self._metrics_dir = tempfile.mkdtemp(prefix="lstm-serve-metrics-")
        # Read by prometheus_client when a worker imports it: every worker then writes its samples to files here.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopping.set())
        worker_values = s.model_dump() | {"port": port, "metrics_port": -1}
        try:
            metrics_port = self._serve_metrics()
            for index in range(s.workers):
                self._start(index, worker_values)
            if not self._wait_started(s.workers):
                return 1
            reserved.close()  # the workers hold the port now
            log.info(
                "serving with %d workers on %s:%d, metrics on %s:%d",
                s.workers,
                s.host,
                port,
                s.metrics_host,
                metrics_port,
            )
            return self._supervise(worker_values)
        finally:
            reserved.close()
            self._stop_all()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _serve_metrics(self) -> int:
        s = self.settings
        if s.metrics_port < 0:
            return -1
        from prometheus_client import CollectorRegistry, Info, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        from lstm_serve.metrics import build_labels, enabled_by_environment

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]
        metrics = "on" if enabled_by_environment() else "off"
        Info("lstm_build", "Version of the running server.", registry=registry).info(
            build_labels() | {"workers": str(s.workers), "metrics": metrics}
        )
        server, _ = start_http_server(s.metrics_port, addr=s.metrics_host, registry=registry)
        return int(server.server_port)

    def _start(self, index: int, values: dict[str, Any]) -> None:
        proc = self._ctx.Process(target=_worker_main, args=(values, index, self._started), name=f"lstm-worker-{index}")
        proc.start()
        self._workers[index] = proc

    def _wait_started(self, count: int) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        pending = set(self._workers)
        while pending and time.monotonic() < deadline and not self._stopping.is_set():
            with contextlib.suppress(Exception):
                index, _ = self._started.get(timeout=0.2)
                pending.discard(index)
            dead = [i for i in pending if not self._workers[i].is_alive()]
            if dead:
                log.error("worker %d exited during start-up (exit code %s)", dead[0], self._workers[dead[0]].exitcode)
                return False
        if pending:
            log.error("workers %s did not start in %.0f s", sorted(pending), START_TIMEOUT)
            return False
        return not self._stopping.is_set()

    def _supervise(self, values: dict[str, Any]) -> int:
        """Restarts dead workers until a signal or a crash loop; returns the exit code."""
        from prometheus_client.multiprocess import mark_process_dead

        while not self._stopping.is_set():
            sentinels = {proc.sentinel: index for index, proc in self._workers.items()}
            for ready in multiprocessing.connection.wait(list(sentinels), timeout=0.5):
                index = sentinels[ready]  # type: ignore[index]
                proc = self._workers[index]
                proc.join()
                if self._stopping.is_set():
                    break
                if proc.pid is not None:
                    mark_process_dead(proc.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
                now = time.monotonic()
                self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW] + [now]
                if len(self._deaths) > RESTART_LIMIT:
                    log.error("workers died %d times in %.0f s; giving up", len(self._deaths), RESTART_WINDOW)
                    return 1
                log.error("worker %d (pid %s) died with exit code %s; restarting it", index, proc.pid, proc.exitcode)
                self._start(index, values)
        return 0

    def _stop_all(self) -> None:
        """SIGTERM to every worker, a drain of shutdown_grace plus margin, then SIGKILL for any that hangs."""
        for proc in self._workers.values():
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace + 10.0
        for proc in self._workers.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker pid %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join(5)
        log.info("stopped %d workers", len(self._workers))
