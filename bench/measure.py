"""Measuring a server set-up under the load generator: CPU placement and CPU time of processes (from /proc), the
counters of a server and its Redis over a window inside a run, and runs of two set-ups back to back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import statistics
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

from prometheus_client.parser import text_string_to_metric_families

from bench.latency import _measure as sequential_latency
from bench.rows import DEMO, Load, summary
from lstm_client import Client
from lstm_client._retry import AFFINITY_KEY
from lstm_client.aio import AsyncClient
from lstm_client.client import DEFAULT_OPTIONS
from lstm_client.loadtest import LoadResult, run_load
from lstm_client.loadtest import runner as loadtest_runner
from tests.procs import LstmServeProcess, ManagedProcess, RedisServer

LATENCY_CALLS = 2000
CLK_TCK = os.sysconf("SC_CLK_TCK")
ALL_CPUS = frozenset(os.sched_getaffinity(0))

# ---------------------------------------------------------------------------------------------------------------------
# CPU placement and accounting, from /proc


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def pin(pids: Iterable[int], cpus: Iterable[int]) -> None:
    """Sets the affinity of every thread of these processes (the threads they start later inherit it)."""
    for pid in pids:
        for tid in _threads(pid):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, set(cpus))


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of these processes (all their threads, living and ended), from /proc/PID/stat."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # from field 3 (state) on: utime is field 14, stime 15
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


@dataclass(frozen=True)
class Placement:
    servers: frozenset[int]
    client: frozenset[int]

    @property
    def pinned(self) -> bool:
        return self.servers != ALL_CPUS

    @staticmethod
    def choose(pin_wanted: bool) -> Placement:
        cpus = sorted(ALL_CPUS)
        if not pin_wanted or len(cpus) < 2:
            return UNPINNED
        return Placement(frozenset(cpus[:-1]), frozenset(cpus[-1:]))

    def apply(self, procs: Iterable[ManagedProcess]) -> None:
        pin([pid for proc in procs for pid in proc.group_alive()], self.servers)
        pin([os.getpid()], self.client)

    def describe(self) -> str:
        if not self.pinned:
            return "unpinned"
        return f"servers on CPU {','.join(map(str, sorted(self.servers)))}, load generator on CPU {min(self.client)}"


UNPINNED = Placement(ALL_CPUS, ALL_CPUS)

# ---------------------------------------------------------------------------------------------------------------------
# A load run with a measured window inside it


def _metrics(url: str, *names: str) -> list[float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    return [sum(s.value for s in samples if s.name == name) for name in names]


@dataclass(frozen=True)
class Counters:
    """What the server side did up to a moment (a snapshot) or between two (a difference, or a sum of them)."""

    seconds: float = 0.0
    steps: float = 0.0  # the server's lstm_steps_total
    batches: float = 0.0  # its backend calls (lstm_batch_size_count)
    calls: dict[str, int] = field(default_factory=dict)  # Redis INFO commandstats: calls by command, INFO left out
    redis_cpu: float = 0.0  # INFO cpu: used_cpu_user + used_cpu_sys
    server_cpu: float = 0.0  # lstm-serve, every process of its group
    client_cpu: float = 0.0  # this process: the load generator

    def __sub__(self, other: Counters) -> Counters:
        return self._combine(other, -1)

    def __add__(self, other: Counters) -> Counters:
        return self._combine(other, 1)

    def _combine(self, other: Counters, sign: int) -> Counters:
        calls = {k: self.calls.get(k, 0) + sign * other.calls.get(k, 0) for k in self.calls.keys() | other.calls}
        return Counters(
            self.seconds + sign * other.seconds,
            self.steps + sign * other.steps,
            self.batches + sign * other.batches,
            {k: v for k, v in calls.items() if v},
            self.redis_cpu + sign * other.redis_cpu,
            self.server_cpu + sign * other.server_cpu,
            self.client_cpu + sign * other.client_cpu,
        )

    def per_step(self, value: float) -> float:
        return value / max(self.steps, 1)


class Probe:
    """Reads the counters of one server and of its Redis, if any."""

    def __init__(self, server: LstmServeProcess, store: RedisServer | None = None) -> None:
        self.server = server
        self.store = store
        self._redis = store.client() if store is not None else None

    def steps(self) -> float:
        return _metrics(self.server.metrics_url, "lstm_steps_total")[0]

    def snapshot(self) -> Counters:
        calls: dict[str, int] = {}
        redis_cpu = 0.0
        if self._redis is not None:
            stats = self._redis.info("commandstats")
            calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}
            cpu = self._redis.info("cpu")
            redis_cpu = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        steps, batches = _metrics(self.server.metrics_url, "lstm_steps_total", "lstm_batch_size_count")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        server_cpu = cpu_seconds(self.server.group_alive())
        client_cpu = usage.ru_utime + usage.ru_stime
        return Counters(time.perf_counter(), steps, batches, calls, redis_cpu, server_cpu, client_cpu)


@dataclass(frozen=True)
class Setup:
    """One way of serving the load: where the load generator connects, and what is watched while it runs."""

    target: str
    probe: Probe | None = None  # counters read over a window inside the run, at full speed
    watch: tuple[ManagedProcess, ...] = ()  # processes whose CPU is summed over the whole run
    connections: int = 1  # the load split over this many clients, each with a connection of its own


@dataclass
class Measured:
    steps_per_s: float
    steps: int
    errors: int
    retries: int
    watched_cpu: dict[int, float] = field(default_factory=dict)  # CPU seconds by PID of `watch`, over the whole run
    window: Counters | None = None

    def note(self) -> str:
        return f"errors {self.errors}" + (f", retries {self.retries}" if self.retries else "")

    def watched_total(self) -> float:
        return sum(self.watched_cpu.values())

    @staticmethod
    def mean(runs: list[Measured]) -> Measured:
        windows = [r.window for r in runs if r.window is not None]
        cpu: dict[int, float] = {}
        for r in runs:
            for pid, seconds in r.watched_cpu.items():
                cpu[pid] = cpu.get(pid, 0.0) + seconds
        return Measured(
            sum(r.steps_per_s for r in runs) / len(runs),
            sum(r.steps for r in runs),
            sum(r.errors for r in runs),
            sum(r.retries for r in runs),
            cpu,
            sum(windows, Counters()) if len(windows) == len(runs) else None,
        )


class _OwnConnection(AsyncClient):
    """The load generator's client, on a connection of its own: gRPC shares one connection between all channels of
    a process that have the same target and options, which would put every client on one --workers process."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, options=[*DEFAULT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)], **kwargs)


async def _load(target: str, load: Load, seconds: float, connections: int) -> LoadResult:
    if connections == 1:
        return await run_load(load.config(target, DEMO, seconds))
    part = Load(load.mode, load.sessions // connections, load.per_stream, load.steps_per_message)
    configs = [replace(part.config(target, DEMO, seconds), seed=i) for i in range(connections)]
    with mock.patch.object(loadtest_runner, "AsyncClient", _OwnConnection):
        results = await asyncio.gather(*(run_load(config) for config in configs))
    merged = LoadResult()
    merged.elapsed = max(r.elapsed for r in results)
    for r in results:
        merged.steps += r.steps
        merged.messages += r.messages
        merged.retries += r.retries
        merged.errors.update(r.errors)
    return merged


async def _run_with_window(setup: Setup, load: Load, seconds: float) -> tuple[LoadResult, Counters | None]:
    task = asyncio.create_task(_load(setup.target, load, seconds, setup.connections))
    probe = setup.probe
    if probe is None:
        return await task, None
    # The window opens once steps flow (the sessions are created first) plus a short warm-up, and closes well
    # before the load's deadline, so that neither the creates nor the closes fall inside it.
    base = await asyncio.to_thread(probe.steps)
    while not task.done():
        if await asyncio.to_thread(probe.steps) > base:
            break
        await asyncio.sleep(0.05)
    window = None
    if not task.done() and seconds >= 1.5:
        await asyncio.sleep(0.3)
        a = await asyncio.to_thread(probe.snapshot)
        await asyncio.sleep(seconds - 1.0)
        b = await asyncio.to_thread(probe.snapshot)
        window = b - a
    return await task, window


def measure(setup: Setup, load: Load, seconds: float) -> Measured:
    def cpu() -> dict[int, float]:
        return {pid: cpu_seconds([pid]) for proc in setup.watch for pid in proc.group_alive()}

    before = cpu()
    result, window = asyncio.run(_run_with_window(setup, load, seconds))
    used = {pid: seconds - before.get(pid, 0.0) for pid, seconds in cpu().items()}
    steps_per_s, _, errors = summary(result)
    return Measured(steps_per_s, result.steps, errors, result.retries, used, window)


def compare(base: Setup, other: Setup, load: Load, seconds: float, rounds: int) -> tuple[Measured, Measured]:
    """`rounds` runs of each, back to back in the order base, other, other, base, base, ...: a drift of the shared
    machine's speed over the pair weighs on both alike. Returns the means."""
    runs: dict[int, list[Measured]] = {0: [], 1: []}
    for i in range(rounds):
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            runs[which].append(measure((base, other)[which], load, seconds))
    return Measured.mean(runs[0]), Measured.mean(runs[1])


def latency_pair(base: str, other: str, rounds: int) -> tuple[float, float]:
    """Median p50 latency of each target over `rounds` measurements, in ABBA order as in `compare`."""
    p50: dict[str, list[float]] = {base: [], other: []}
    for i in range(rounds):
        for target in (base, other) if i % 2 == 0 else (other, base):
            p50[target].append(latency_p50(target))
    return statistics.median(p50[base]), statistics.median(p50[other])


def latency_p50(target: str) -> float:
    """p50 of sequential unary Steps, one session, its id sent as x-session-id (nginx's affinity key)."""
    with Client(target) as client:
        session = client.create_session(DEMO, ttl=0)
    return sequential_latency(target, session.id, LATENCY_CALLS, metadata=((AFFINITY_KEY, session.id),))["p50_us"]
