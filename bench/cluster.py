"""`make bench`, section "Sessions outside the process": the Redis session store against the memory store, `--workers 2`
against `--workers 1`, and nginx in front against calling a replica directly. Every figure is a ratio to a baseline
measured in the same run, back to back with it.

    python -m bench.run --only cluster [--cluster-seconds 3] [--cluster-rounds 2] [--no-pin] [--no-write]

Real processes on loopback, started by tests/procs.py's harness: redis-server, lstm-serve, and Debian's nginx serving
deploy/nginx/lstm-serve.conf unchanged. With 2 or more cores, the servers (lstm-serve, redis-server, nginx: every
thread of every process of theirs) are pinned to all cores but the last and the load generator (this process) to the
last one, so that the server side has the same CPU for the baseline as for the figure compared with it. The --workers
row runs unpinned (pinned to one core, a second worker could not help), its load spread over 16 connections
(SO_REUSEPORT hands connections, not calls, to the workers).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import pytest

from bench.measure import (
    ALL_CPUS,
    UNPINNED,
    Counters,
    Placement,
    Probe,
    Setup,
    compare,
    latency_pair,
    pin,
)
from bench.rows import DEMO, Load, Row, cpu_model, fmt_row
from bench.servers import REPO
from tests.procs import LstmServeProcess, ManagedProcess, Nginx, RedisServer, require, running

SECTION = "## Sessions outside the process: Redis, workers, nginx"
WIDTH = 118  # the prose of docs/performance.md
NOTES = Path(__file__).with_name("cluster_notes.md").read_text().splitlines()
MODELS = REPO / "models"
STREAM_TARGET = ">= 0.6 x memory store"
NGINX_TARGET = ">= 0.7 x direct"
WORKER_CONNECTIONS = 16  # SO_REUSEPORT spreads connections, not calls, over the workers
ROUNDS = 2  # runs of each set-up per comparison, in ABBA order
TOP_LEVEL = ("evalsha", "eval", "ping", "script")  # what lstm-serve sends; the rest runs inside its scripts

# ---------------------------------------------------------------------------------------------------------------------
# The section


@dataclass
class Cluster:
    root: Path
    store: RedisServer = field(init=False)
    memory: LstmServeProcess = field(init=False)
    redis1: LstmServeProcess = field(init=False)
    redis2: LstmServeProcess = field(init=False)
    workers2: LstmServeProcess = field(init=False)
    nginx_memory: Nginx = field(init=False)
    nginx_redis1: Nginx = field(init=False)
    nginx_redis2: Nginx = field(init=False)

    def __post_init__(self) -> None:
        root = self.root
        self.store = RedisServer(root / "redis")
        flags = ("--models", DEMO, "--max-sessions", "1000000")
        redis_flags = (*flags, "--store", self.store.url)

        def serve(name: str, *args: str) -> LstmServeProcess:
            return LstmServeProcess(MODELS, *args, log_dir=root / name, name=name)

        self.memory = serve("memory", *flags)
        self.redis1 = serve("redis-replica-1", *redis_flags)
        self.redis2 = serve("redis-replica-2", *redis_flags)
        self.workers2 = serve("redis-workers-2", *redis_flags, "--workers", "2")
        self.nginx_memory = Nginx(root / "nginx-memory", [self.memory.port])
        self.nginx_redis1 = Nginx(root / "nginx-redis-1", [self.redis1.port])
        self.nginx_redis2 = Nginx(root / "nginx-redis-2", [self.redis1.port, self.redis2.port], hash_on_session=True)

    def procs(self) -> list[ManagedProcess]:
        return [
            self.store,
            self.memory,
            self.redis1,
            self.redis2,
            self.workers2,
            self.nginx_memory,
            self.nginx_redis1,
            self.nginx_redis2,
        ]

    @contextlib.contextmanager
    def running(self) -> Iterator[Cluster]:
        with running(*self.procs(), timeout=60):
            yield self


def missing_programs() -> str | None:
    """Why the section cannot run here (redis-server or nginx not installed), or None."""
    try:
        for program in ("redis-server", "nginx"):
            require(program)  # raises pytest.skip (pytest.fail in CI) naming the Debian package
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:
        return str(exc)
    return None


@dataclass
class Results:
    seconds: float
    rounds: int
    placement: Placement
    load_average: float  # of the machine (1 minute) when the section started: other people's jobs
    rows: list[Row] = field(default_factory=list)
    cpu_lines: list[str] = field(default_factory=list)  # the CPU-per-step table, one line per load and store


def run(seconds: float, placement: Placement, rounds: int = ROUNDS) -> Results:
    results = Results(seconds, rounds, placement, os.getloadavg()[0])

    def add(row: Row) -> None:
        results.rows.append(row)
        print(fmt_row(row), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp, Cluster(Path(tmp)).running() as c:
        try:
            placement.apply(c.procs())
            results.cpu_lines = _redis_vs_memory(c, seconds, rounds, add)
            UNPINNED.apply(c.procs())
            _workers(c, seconds, rounds, add)
            placement.apply(c.procs())
            _nginx(c, seconds, rounds, add)
        finally:
            pin([os.getpid()], ALL_CPUS)
    return results


def _short(load: Load) -> str:
    """The load in a row's label (the section says: demo model, 1 step per message, 1 session per stream)."""
    return f"{load.sessions} streams" if load.mode == "stream" else f"{load.sessions} sessions unary"


def _redis_vs_memory(c: Cluster, seconds: float, rounds: int, add: Callable[[Row], None]) -> list[str]:
    """The Redis rows; returns the lines of the CPU-per-step table (every load, both stores)."""
    watched = Load("stream", 256)
    windows: tuple[Counters, Counters] | None = None
    cpu_lines: list[str] = []
    for load in (Load("stream", 64), watched, Load("unary", 64), Load("unary", 256)):
        memory = Setup(c.memory.target, Probe(c.memory))
        redis = Setup(c.redis1.target, Probe(c.redis1, c.store))
        mem, red = compare(memory, redis, load, seconds, rounds)
        label = f"{_short(load)}: Redis store / memory store, steps/s ({red.note()} / {mem.errors})"
        add(Row(label, red.steps_per_s, "steps/s", mem.steps_per_s, STREAM_TARGET if load.mode == "stream" else ""))
        if mem.window is not None and red.window is not None:
            for store, window in (("memory", mem.window), ("Redis", red.window)):
                cpu_lines.append(_cpu_line(load, store, window))
                print(cpu_lines[-1], flush=True)
            if load == watched:
                windows = (mem.window, red.window)
    if windows is None:
        print("no measured window (runs too short): the Redis cost rows are left out", flush=True)
        return cpu_lines
    m, w = windows
    print(f"Redis commands over {w.steps:,.0f} steps ({w.seconds:.1f} s): {w.calls}", flush=True)
    round_trips = sum(w.calls.get(name, 0) for name in TOP_LEVEL)
    evalsha = w.calls.get("evalsha", 0)
    inside = sum(w.calls.values()) - round_trips
    what = f"{_short(watched)}, Redis store"
    batch = w.steps / max(w.batches, 1)
    add(Row(f"{what}: Redis calls (round trips) per step", w.per_step(round_trips), ""))
    add(
        Row(
            f"{what}: EVALSHA per backend batch (mean batch {batch:.1f})", evalsha / max(w.batches, 1), "", None, "<= 1"
        )
    )
    add(Row(f"{what}: sessions per EVALSHA", w.steps / max(evalsha, 1), ""))
    add(Row(f"{what}: commands Redis runs inside the scripts, per step", w.per_step(inside), ""))
    add(Row(f"{what}: redis-server CPU per step", w.per_step(w.redis_cpu) * 1e6, "us"))
    both = f"{_short(watched)}, Redis store / memory store"
    for name, ours, base in (
        ("lstm-serve", w.server_cpu, m.server_cpu),
        ("load generator", w.client_cpu, m.client_cpu),
    ):
        add(Row(f"{both}: {name} CPU per step", w.per_step(ours) * 1e6, "us", m.per_step(base) * 1e6))
    return cpu_lines


CPU_HEADER = [
    "| load | store | steps/s in the window | mean batch | sessions per EVALSHA | lstm-serve | redis-server "
    "| load generator |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
]


def _cpu_line(load: Load, store: str, w: Counters) -> str:
    """One row of the CPU-per-step table: a store under a load, over the measured windows of its runs."""
    evalsha = w.calls.get("evalsha", 0)
    per_commit = f"{w.steps / evalsha:.1f}" if evalsha else ""
    redis = f"{w.per_step(w.redis_cpu) * 1e6:.0f} us" if w.calls else ""
    server, client = (f"{w.per_step(cpu) * 1e6:.0f} us" for cpu in (w.server_cpu, w.client_cpu))
    rate, batch = w.steps / max(w.seconds, 1e-9), w.steps / max(w.batches, 1)
    return f"| {_short(load)} | {store} | {rate:,.0f} | {batch:.1f} | {per_commit} | {server} | {redis} | {client} |"


def _workers(c: Cluster, seconds: float, rounds: int, add: Callable[[Row], None]) -> None:
    load = Load("stream", 256)
    one = Setup(c.redis1.target, connections=WORKER_CONNECTIONS)
    two = Setup(c.workers2.target, watch=(c.workers2,), connections=WORKER_CONNECTIONS)
    m1, m2 = compare(one, two, load, seconds, rounds)
    total = max(m2.watched_total(), 1e-9)
    split = "/".join(
        f"{100 * v / total:.0f}" for v in sorted(m2.watched_cpu.values(), reverse=True) if v > 0.05 * total
    )
    label = (
        f"{_short(load)} over {WORKER_CONNECTIONS} connections, Redis store, unpinned: --workers 2 / --workers 1, "
        f"steps/s (CPU split between the workers {split} %; {m2.note()} / {m1.errors})"
    )
    add(Row(label, m2.steps_per_s, "steps/s", m1.steps_per_s))


def _nginx(c: Cluster, seconds: float, rounds: int, add: Callable[[Row], None]) -> None:
    load = Load("stream", 64)
    pairs = [
        ("memory store, nginx -> 1 replica / direct", c.memory, c.nginx_memory),
        ("Redis store, nginx -> 1 replica / direct", c.redis1, c.nginx_redis1),
        ("Redis store, nginx -> 2 replicas (hash on session) / direct to one", c.redis1, c.nginx_redis2),
    ]
    nginx_cpu: list[float] = []
    for what, direct, nginx in pairs:
        d, p = compare(Setup(direct.target), Setup(nginx.target, watch=(nginx,)), load, seconds, rounds)
        label = f"{_short(load)}, {what}, steps/s ({p.note()} / {d.errors})"
        add(Row(label, p.steps_per_s, "steps/s", d.steps_per_s, NGINX_TARGET))
        nginx_cpu.append(p.watched_total() / max(p.steps, 1) * 1e6)
    add(Row(f"{_short(load)} through nginx: nginx CPU per step (mean of the 3 set-ups)", sum(nginx_cpu) / 3, "us"))
    for what, direct, nginx in pairs:
        d_us, p_us = latency_pair(direct.target, nginx.target, rounds)
        add(Row(f"sequential unary Step p50, {what}", p_us, "us", d_us))


# ---------------------------------------------------------------------------------------------------------------------
# The report


def _program_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    text = (out.stdout + out.stderr).strip()
    for word in text.replace("/", " ").replace("=", " ").split():
        if word[:1].isdigit():
            return word
    return "?"


def markdown(results: Results) -> list[str]:
    seconds, rounds = results.seconds, results.rounds
    versions = ", ".join(f"{p} {version(p)}" for p in ("grpcio", "redis"))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    programs = (
        f"redis-server {_program_version(['redis-server', '--version'])}, nginx {_program_version([nginx, '-v'])}"
    )
    intro = (
        "Measured by the same `make bench` (bench/cluster.py; this section alone: `python -m bench.run --only "
        "cluster`, which rewrites only this part of the file). Each row compares two set-ups under the same load "
        f"generator in this run: ratio = the row's figure / the baseline's. Each set-up runs {rounds} x {seconds:g} s "
        f"per ratio, the two back to back in ABBA order (mean shown; latency: median of {rounds} p50s). Model demo "
        "(`models/elnino`), 1 step per message, 1 session per stream. Real processes on loopback, started by "
        "tests/procs.py: redis-server (no persistence), lstm-serve, nginx serving deploy/nginx/lstm-serve.conf "
        f"unchanged (one worker process). CPU placement: {results.placement.describe()} (every thread of every "
        "process), except the --workers row (unpinned)."
    )
    machine = (
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, {versions}, "
        f"{programs}. Run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 1-minute load average when the "
        f"section started: {results.load_average:.2f} (other jobs on the shared machine; the section itself adds "
        "about 2)."
    )
    cpu_intro = (
        "CPU per step over the measured windows of the memory / Redis store runs above, by load: user + system time "
        "divided by the steps the server counted in the same windows (see below)."
    )
    return [
        SECTION,
        "",
        *textwrap.wrap(intro, WIDTH, break_on_hyphens=False),
        "",
        *textwrap.wrap(machine, WIDTH, break_on_hyphens=False),
        "",
        "| scenario | figure | baseline | ratio | target |",
        "| --- | --- | --- | --- | --- |",
        *(fmt_row(r) for r in results.rows),
        "",
        *textwrap.wrap(cpu_intro, WIDTH, break_on_hyphens=False),
        "",
        *CPU_HEADER,
        *results.cpu_lines,
        "",
        *NOTES,
        "",
    ]
