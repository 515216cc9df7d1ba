"""Real programs as subprocesses on 127.0.0.1, for tests that need whole processes: redis-server, lstm-serve, nginx.

Every program runs in its own process group (start_new_session), with stdout and stderr appended to a log file. A
harness object starts it, waits until it is ready (bounded in time), and stops only what it started: SIGTERM to its
PID, a bounded wait, then SIGKILL to the members of its process group (the workers of a multi-process lstm-serve or
nginx), found by PID in /proc. Use them as context managers (stopped on exit, log tail printed when the body failed) or
through pytest fixtures:

    with RedisServer(tmp_path) as redis, LstmServeProcess(models, "--store", redis.url) as server:
        server.kill9()
        server.restart()

Linux only (/proc). Outside CI a missing program skips the test (`require`); in CI (CI=true) it fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    import redis

REPO = Path(__file__).resolve().parent.parent
NGINX_CONF = REPO / "deploy" / "nginx" / "lstm-serve.conf"
READINESS_SERVICE = "lstm.v1.LstmService"

START_TIMEOUT = 30.0  # seconds a program gets to become ready
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
PROBE_INTERVAL = 0.05
APT_PACKAGE = {
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "nginx": "nginx",
    "promtool": "prometheus",
    "docker-compose": "docker-compose",
}


def require(program: str) -> str:
    """The program's path; skips the test when it is not installed, fails it in CI where .ci/run installs it."""
    path = shutil.which(program) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{program}", os.X_OK)), None
    )
    if path is None:
        package = APT_PACKAGE.get(program, program)
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed: .ci/run must install the Debian package {package}")
        pytest.skip(f"{program} not installed (apt-get install {package})")
    return path


def free_port() -> int:
    """A port nothing listens on right now (the usual small race: another process may take it before we bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health_status(target: str, service: str = READINESS_SERVICE, timeout: float = 1.0) -> str:
    """What `lstm-serve health --target TARGET --service SERVICE` sees: SERVING, NOT_SERVING, SERVICE_UNKNOWN, ... or
    the gRPC code name when the call fails (UNAVAILABLE, DEADLINE_EXCEEDED). A fresh connection every time (a local
    subchannel pool), so that with SO_REUSEPORT workers each probe may reach a different process."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            members.append(int(entry.name))
    return members


class ManagedProcess:
    """One program run as a subprocess in its own process group; subclasses say how to run it and when it is ready."""

    name = "process"
    instances: ClassVar[weakref.WeakSet[ManagedProcess]] = weakref.WeakSet()  # for printing logs when a test fails

    def __init__(self, log_dir: Path) -> None:
        ManagedProcess.instances.add(self)
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # -- what subclasses provide --------------------------------------------------------------------------------------
    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def probe(self) -> bool:
        """One quick readiness check (about a second at most)."""
        raise NotImplementedError

    # -- life cycle ---------------------------------------------------------------------------------------------------
    def start(self) -> Self:
        """Starts the program (not waiting for it); see wait_ready."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.starts += 1
        argv = self.argv()
        with open(self.log_path, "ab") as log:
            log.write(f"--- start #{self.starts}: {' '.join(argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Self:
        """Polls `probe` until it passes; raises (with the log's tail) when the program exits or the time runs out."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / PROBE_INTERVAL) + 1):
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise RuntimeError(f"{self.name} exited with {code} before it was ready:\n{self.log_tail()}")
            if self.probe():
                return self
            if time.monotonic() > deadline:
                break
            time.sleep(PROBE_INTERVAL)
        self.stop()
        raise TimeoutError(f"{self.name} was not ready within {timeout} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status of the last run (None while running; -N: killed by signal N)."""
        return None if self._proc is None else self._proc.poll()

    def group_alive(self) -> list[int]:
        """PIDs still alive in the program's process group (children a crashed or killed parent left behind)."""
        return [] if self._proc is None else _group_members(self._proc.pid)

    def send(self, sig: int) -> None:
        """Sends a signal to the main process only (SIGSTOP/SIGCONT to freeze it, SIGHUP, ...)."""
        if self.running:
            os.kill(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int | None:
        """Sends `sig` to the main process and waits; SIGKILLs the whole group after `timeout` s and kills whatever of
        the group is left once the main process is gone. Returns the exit status (None if never started)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a frozen process cannot act on SIGTERM
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"{self.name} (pid {proc.pid}) ignored signal {sig} for {timeout} s: SIGKILL", file=sys.stderr)
                self._kill_group()
                proc.wait(STOP_TIMEOUT)
        leftovers = self._kill_group()
        if leftovers:
            print(f"{self.name}: killed {leftovers} left behind in its process group", file=sys.stderr)
        return proc.returncode

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM to the main process (as Docker's `stop` does), wait for it to exit; returns its exit status."""
        return self.stop(signal.SIGTERM, timeout)

    def kill9(self) -> int | None:
        """SIGKILL to the whole process group at once (a crash, an OOM kill of the container), then reap."""
        proc = self._proc
        if proc is None:
            return None
        self._kill_group()
        proc.wait(STOP_TIMEOUT)
        return proc.returncode

    def _kill_group(self) -> list[int]:
        proc = self._proc
        if proc is None:
            return []
        members = _group_members(proc.pid)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for _ in range(int(STOP_TIMEOUT / PROBE_INTERVAL)):  # bounded wait until they are gone
            if proc.poll() is not None and not _group_members(proc.pid):
                break
            time.sleep(PROBE_INTERVAL)
        return [pid for pid in members if pid != proc.pid]

    def restart(self, *, hard: bool = False, timeout: float = START_TIMEOUT) -> Self:
        """Stops (SIGKILL to the group when `hard`, else SIGTERM and wait) and starts again with the same ports and
        files, waiting until ready."""
        if hard:
            self.kill9()
        else:
            self.terminate()
        return self.start().wait_ready(timeout)

    # -- logs ---------------------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        """Everything the program wrote to stdout and stderr, over all its starts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_mtime(self) -> float:
        """When the log was last written (0 if never)."""
        try:
            return self.log_path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def print_log(self) -> None:
        print(f"\n----- {self.name} log ({self.log_path}) -----\n{self.log_tail()}\n----- end of {self.name} log -----")

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.print_log()
        self.stop()


@contextlib.contextmanager
def running(*procs: ManagedProcess, timeout: float = START_TIMEOUT) -> Iterator[tuple[ManagedProcess, ...]]:
    """Starts every program first and then waits for each, so that slow starts overlap; stops them all on exit (in
    reverse order), printing their logs when the body failed."""
    with contextlib.ExitStack() as stack:
        for proc in procs:
            proc.start()
            stack.callback(proc.stop)
        try:
            for proc in procs:
                proc.wait_ready(timeout)
            yield procs
        except BaseException:
            for proc in procs:
                proc.print_log()
            raise


# ---------------------------------------------------------------------------------------------------------------------
class RedisServer(ManagedProcess):
    """`redis-server` on 127.0.0.1:`port` (free by default), data in `directory`, no RDB snapshots unless `save`.

    `appendonly`: False (no AOF), True or "everysec" (AOF fsynced every second), "always" (fsync on every write: a
    SIGKILL loses nothing that was acknowledged). Protected mode stays at its default.
    """

    name = "redis"

    def __init__(
        self,
        directory: Path,
        appendonly: bool | Literal["always", "everysec"] = False,
        *,
        port: int | None = None,
        save: str = "",
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(directory)
        self.binary = require("redis-server")
        self.directory = Path(directory)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.save = save
        self.extra_args = list(extra_args)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", self.save,
            "--daemonize", "no",
            "--logfile", "",  # stdout, which is the log file
        ]  # fmt: skip
        if self.appendonly:
            fsync = "everysec" if self.appendonly is True else self.appendonly
            args += ["--appendonly", "yes", "--appendfsync", fsync]
        return args + self.extra_args

    def ping(self, timeout: float = 1.0) -> bool:
        """PING over a plain socket: True on +PONG (not while redis still loads its AOF: that answers -LOADING)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def probe(self) -> bool:
        return self.ping()

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client for this server (needs the `redis` package)."""
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5, **kwargs)

    def kill(self) -> int | None:
        """SIGKILL: what was not yet fsynced is lost."""
        return self.kill9()

    def restart(self, *, hard: bool = True, timeout: float = START_TIMEOUT) -> Self:
        """SIGKILL (default; SIGTERM when hard=False) and start again on the same port and directory."""
        return super().restart(hard=hard, timeout=timeout)

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (a hung or partitioned store); `resume` to continue."""
        self.send(signal.SIGSTOP)

    def resume(self) -> None:
        self.send(signal.SIGCONT)


# ---------------------------------------------------------------------------------------------------------------------
class LstmServeProcess(ManagedProcess):
    """`lstm-serve serve` from this venv, on 127.0.0.1: `--port` (free, or given: to restart on or share a port),
    `--metrics-port` free, `--model-dir model_dir`, then `extra_args` (later flags win, so they may override ours).

    Ready when the readiness health service (lstm.v1.LstmService) answers SERVING, as `lstm-serve health --service
    lstm.v1.LstmService` would; with `--workers N` that must hold for 2N probes in a row on fresh connections.
    """

    name = "lstm-serve"

    def __init__(
        self,
        model_dir: Path,
        *extra_args: str,
        port: int | None = None,
        metrics_port: int | None = None,
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        if name is not None:
            self.name = name
        super().__init__(log_dir or Path(tempfile.mkdtemp(prefix="lstm-serve-")))
        self.model_dir = Path(model_dir)
        self.extra_args = list(extra_args)
        self.port = port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.extra_env = env or {}

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "lstm_serve.cli", "serve",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--metrics-host", "127.0.0.1",
            "--metrics-port", str(self.metrics_port),
            "--model-dir", str(self.model_dir),
            *self.extra_args,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return os.environ | {"PYTHONUNBUFFERED": "1"} | self.extra_env

    def _workers(self) -> int:
        args = self.extra_args
        for i, arg in enumerate(args):
            if arg == "--workers" and i + 1 < len(args):
                return int(args[i + 1])
            if arg.startswith("--workers="):
                return int(arg.split("=", 1)[1])
        return 1

    def health(self, service: str = READINESS_SERVICE, timeout: float = 1.0) -> str:
        """The health status name of `service` (or the gRPC error code name); see health_status."""
        return health_status(self.target, service, timeout)

    def probe(self) -> bool:
        return all(self.health() == "SERVING" for _ in range(1 if self._workers() == 1 else 2 * self._workers()))


# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AccessLogEntry:
    """One line of the test nginx's access log: a finished gRPC call and the replica that served it."""

    path: str  # /lstm.v1.LstmService/Predict
    status: int  # HTTP status (200 for every gRPC answer, errors included; 502 when no replica answered)
    upstream: str  # 127.0.0.1:PORT, or several separated by ", " when nginx went on to the next replica
    session_id: str  # the x-session-id header, "-" when absent
    grpc_status: str  # the grpc-status trailer, "-" when absent

    @property
    def method(self) -> str:
        return self.path.rsplit("/", 1)[-1]


class Nginx(ManagedProcess):
    """Debian's nginx in the foreground, serving deploy/nginx/lstm-serve.conf unchanged in front of `upstream_ports`.

    Generates only what an operator writes per deployment (`lstm-serve.d/upstream.conf`: the replicas, and
    `hash $lstm_serve_affinity consistent;` when `hash_on_session`; `lstm-serve.d/listen.conf`), plus the main-context
    wrapper that Debian's /etc/nginx/nginx.conf would be: a prefix under `directory`, every path (pid, logs, temp
    directories) inside it, one worker, an access log naming each call's replica (`access_log()`).
    """

    name = "nginx"

    def __init__(
        self, directory: Path, upstream_ports: Sequence[int], hash_on_session: bool = False, *, port: int | None = None
    ) -> None:
        super().__init__(directory)
        self.binary = require("nginx")
        self.prefix = Path(directory).resolve()
        self.port = port or free_port()
        self.upstream_ports = list(upstream_ports)
        self.hash_on_session = hash_on_session
        self.conf_path = self.prefix / "nginx.conf"
        self.access_log_path = self.prefix / "access.log"
        self.error_log_path = self.prefix / "error.log"
        self._write_config()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        include = self.prefix / "lstm-serve.d"
        include.mkdir(exist_ok=True)
        servers = "".join(f"server 127.0.0.1:{port} max_fails=1 fail_timeout=2s;\n" for port in self.upstream_ports)
        balance = "hash $lstm_serve_affinity consistent;\n" if self.hash_on_session else ""
        (include / "upstream.conf").write_text(balance + servers)
        (include / "listen.conf").write_text(f"listen 127.0.0.1:{self.port} http2;\n")
        temp = self.prefix / "temp"
        temp.mkdir(exist_ok=True)
        temp_paths = "".join(
            f"    {kind}_temp_path {temp / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        # As root, workers would run as nobody and could not enter a private tmp dir; only the master reads the config
        # and opens the logs, but keep the workers able to use the temp paths too.
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf_path.write_text(
            f"# Generated by tests/procs.py: the main context around {NGINX_CONF} (used unchanged).\n"
            f"daemon off;\nmaster_process on;\nworker_processes 1;\n{user}"
            f"pid {self.prefix / 'nginx.pid'};\n"
            f"error_log {self.error_log_path} info;\n"
            "events {\n    worker_connections 1024;\n}\n"
            "http {\n"
            '    log_format calls \'$request_uri $status "$upstream_addr" "$http_x_session_id" "$upstream_trailer_grpc_status"\';\n'  # noqa: E501
            f"    access_log {self.access_log_path} calls;\n"
            f"{temp_paths}"
            f"    include {NGINX_CONF};\n"
            "}\n"
        )

    def argv(self) -> list[str]:
        # -p: prefix for relative paths; -c: the config, whose directory is where relative includes resolve;
        # -e: the error log from the very start (before the config is read), instead of the compiled-in path.
        return [self.binary, "-p", f"{self.prefix}/", "-c", str(self.conf_path), "-e", str(self.error_log_path)]

    def test_config(self) -> subprocess.CompletedProcess[str]:
        """`nginx -t` on the generated config."""
        return subprocess.run([*self.argv(), "-t"], capture_output=True, text=True, timeout=30)

    def probe(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def log_text(self) -> str:
        """The error log (nginx's own messages: upstream failures, retries) after whatever went to stdout/stderr."""
        try:
            errors = self.error_log_path.read_text(errors="replace")
        except FileNotFoundError:
            errors = ""
        return super().log_text() + errors

    def log_mtime(self) -> float:
        try:
            errors = self.error_log_path.stat().st_mtime
        except FileNotFoundError:
            errors = 0.0
        return max(super().log_mtime(), errors)

    def access_log(self) -> list[AccessLogEntry]:
        """The calls nginx finished so far (a stream is logged when it ends)."""
        try:
            lines = self.access_log_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            path, status, rest = line.split(" ", 2)
            upstream, session_id, grpc_status = rest.strip('"').split('" "')
            entries.append(AccessLogEntry(path, int(status), upstream, session_id, grpc_status))
        return entries


NginxFactory = Callable[..., Nginx]  # tests/cluster's make_nginx: (upstream_ports, hash_on_session) -> Nginx
