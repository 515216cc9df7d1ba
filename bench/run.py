"""`make bench`: lstm-serve against the bare gRPC ceiling, measured in ONE run on this machine, on loopback.

Prints every figure with its ratio to the echo server carrying the same payloads, then writes docs/performance.md.
Servers run as separate processes; the load generator (lstm-loadtest's engine) runs here. Every load is bounded in
sessions, steps and seconds. The last section (bench/cluster.py) compares the Redis session store with the memory
store, --workers 2 with 1, and nginx in front with direct calls; `python -m bench.run --only cluster` runs it alone
(about 3 minutes) and rewrites only that section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import backends, cluster, long_requests, pinned
from bench.latency import _measure as sequential_latency
from bench.measure import Placement
from bench.rows import DEMO, Load, Row, cpu_model, fmt_row, splice, throughput
from bench.servers import REPO, Server, echo_server, lstm_serve_argv, lstm_server
from lstm_client import Client
from lstm_client._calls import step_request
from lstm_client.aio import AsyncClient
from lstm_serve.engine.npz import save_npz

NOTES = (Path(__file__).with_name("notes.md")).read_text().splitlines()
BIG = "big512"
BIG_INPUT = backends.INPUT


def make_big_model(root: Path) -> Path:
    """An H=512 model with random weights (speed does not depend on the values)."""
    directory = root / BIG
    directory.mkdir(parents=True)
    save_npz(backends.random_weights(512), directory / "weights.npz")
    (directory / "model.toml").write_text('description = "benchmark: random weights"\nweights = "weights.npz"\n')
    return root


def mean_batch(server: Server, before: tuple[float, float]) -> float:
    total = server.metric_sum("lstm_batch_size_sum") - before[0]
    count = server.metric_sum("lstm_batch_size_count") - before[1]
    return total / count if count else 0.0


def batch_counters(server: Server) -> tuple[float, float]:
    return server.metric_sum("lstm_batch_size_sum"), server.metric_sum("lstm_batch_size_count")


async def _create_sessions(target: str, n: int) -> list[str]:
    async with AsyncClient(target) as client:
        gate = asyncio.Semaphore(128)

        async def one() -> str:
            async with gate:
                return (await client.create_session(DEMO)).id

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def _step_each(target: str, ids: list[str], input_size: int) -> None:
    x = np.zeros(input_size, np.float32)
    async with AsyncClient(target) as client:
        gate = asyncio.Semaphore(128)

        async def one(session_id: str) -> None:
            async with gate:
                await client._stub.Step(step_request(session_id, 1, x))

        await asyncio.gather(*(one(i) for i in ids))


def memory_per_session(model_dir: Path, sessions: int) -> dict[str, float]:
    """RSS growth of the server process per session: idle (just created) and after one step (state + stored reply)."""
    with lstm_server(model_dir, "--models", DEMO, "--session-ttl", "0") as server, Client(server.target) as client:
        info = client.get_model(DEMO)
        base = server.rss_bytes()
        ids = asyncio.run(_create_sessions(server.target, sessions))
        idle = server.rss_bytes()
        asyncio.run(_step_each(server.target, ids, info.input_size))
        stepped = server.rss_bytes()
    state = 2 * info.num_layers * info.hidden_size * 4
    return {
        "state_bytes": state,
        "idle_per_session": (idle - base) / sessions,
        "stepped_per_session": (stepped - base) / sessions,
        "target": state + 512,
    }


def time_to_serving(model_dir: Path) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = lstm_serve_argv(model_dir, "--models", DEMO)
    argv[argv.index("--port") + 1] = str(port)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.perf_counter() - start < 60:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - start
                except grpc.RpcError:
                    pass
                time.sleep(0.01)
        raise TimeoutError("not SERVING after 60 s")
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each throughput run")
    parser.add_argument("--sessions-for-memory", type=int, default=100_000)
    parser.add_argument("--no-write", action="store_true", help="do not rewrite docs/performance.md")
    parser.add_argument(
        "--only",
        choices=["cluster", "pinned"],
        help="run one section and rewrite only its part of docs/performance.md",
    )
    parser.add_argument("--no-pin", action="store_true", help="cluster section: leave every process on every CPU")
    parser.add_argument("--cluster-seconds", type=float, default=3.0, help="cluster section: length of each run")
    parser.add_argument(
        "--cluster-rounds", type=int, default=cluster.ROUNDS, help="cluster section: runs of each set-up per ratio"
    )
    args = parser.parse_args()
    placement = Placement.choose(not args.no_pin)
    report = REPO / "docs" / "performance.md"
    if args.only == "cluster":
        section = run_cluster(args, placement)
        if not args.no_write:
            report.write_text(splice(report.read_text(), section))
            print(f"wrote the cluster section of {report.relative_to(REPO)}")
        return
    if args.only == "pinned":
        section = run_pinned(args, placement)
        if not args.no_write:
            report.write_text(splice(report.read_text(), section))
            print(f"wrote the pinned section of {report.relative_to(REPO)}")
        return
    rows, backend_lines = run_core(args)
    section = run_pinned(args, placement) + run_cluster(args, placement)
    if not args.no_write:
        write_report(rows, args, backend_lines, section)


def run_pinned(args: argparse.Namespace, placement: Placement) -> list[str]:
    """The section "The server's own cost" (bench/pinned.py), as markdown lines."""
    if not placement.pinned:
        return [pinned.SECTION, "", "Not measured in this run: one CPU, or --no-pin.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / DEMO).symlink_to(REPO / "models" / DEMO)
        rows, where = pinned.run(Path(tmp), args.seconds, placement)
    for row in rows:
        print(fmt_row(row), flush=True)
    return pinned.markdown(rows, where)


def run_cluster(args: argparse.Namespace, placement: Placement) -> list[str]:
    """The section "Sessions outside the process" (Redis store, workers, nginx), as markdown lines."""
    missing = cluster.missing_programs()
    if missing is not None:
        print(f"cluster section not measured: {missing}", flush=True)
        return [cluster.SECTION, "", f"Not measured in this run: {missing}.", ""]
    return cluster.markdown(cluster.run(args.cluster_seconds, placement, args.cluster_rounds))


def run_core(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    """lstm-serve against the echo ceiling, batching, memory, start-up, backends: rows and the backends' markdown."""
    rows: list[Row] = []

    def emit(row: Row) -> None:
        rows.append(row)
        print(fmt_row(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        (model_dir / DEMO).symlink_to(REPO / "models" / DEMO)
        make_big_model(model_dir)

        # 1. sequential unary latency, interleaved runs, medians
        echo_p50, echo_p99, our_p50, our_p99 = [], [], [], []
        for _ in range(3):
            with echo_server() as echo:
                e = sequential_latency(echo.target, "echo", 2000)
            with lstm_server(model_dir, "--models", DEMO) as server, Client(server.target) as client:
                session = client.create_session(DEMO, ttl=0)
                o = sequential_latency(server.target, session.id, 2000)
            echo_p50.append(e["p50_us"])
            echo_p99.append(e["p99_us"])
            our_p50.append(o["p50_us"])
            our_p99.append(o["p99_us"])
        med = statistics.median
        emit(Row("sequential unary Step, p50 latency (demo)", med(our_p50), "us", med(echo_p50), "<= 1.2 x echo"))
        emit(Row("sequential unary Step, p99 latency (demo)", med(our_p99), "us", med(echo_p99)))

        # 2. throughput, demo model vs echo carrying the same payloads
        demo_loads = [
            Load("unary", 64),
            Load("unary", 256),
            Load("unary", 64, steps_per_message=16),
            Load("stream", 64),
            Load("stream", 256),
            Load("stream", 256, per_stream=16),
            Load("stream", 256, per_stream=16, steps_per_message=16),
        ]
        echo_rates: dict[Load, float] = {}
        with echo_server(input_size=1) as echo:
            for load in demo_loads:
                echo_rates[load] = throughput(echo.target, DEMO, load, args.seconds)[1]
        with lstm_server(model_dir, "--models", DEMO) as server:
            for load in demo_loads:
                before = batch_counters(server)
                steps, _, errors = throughput(server.target, DEMO, load, args.seconds)
                target = ""
                if load == Load("stream", 64):
                    target = ">= 0.9 x echo msg/s"
                elif load.steps_per_message == 16 and load.per_stream > 1:
                    target = ">= 3 x echo msg/s"
                batch = mean_batch(server, before)
                label = f"demo, {load.label()}: steps/s (mean batch {batch:.1f}, errors {errors})"
                emit(Row(label, steps, "steps/s", echo_rates[load], target))

        # 3. the big model: batching on and off
        big_loads = [Load("unary", 64), Load("stream", 256, per_stream=16)]
        with echo_server(input_size=BIG_INPUT) as echo:
            big_echo = {load: throughput(echo.target, BIG, load, args.seconds)[1] for load in big_loads}
        big: dict[tuple[Load, bool], float] = {}
        for batching in (True, False):
            flags = ["--models", BIG] + ([] if batching else ["--max-batch", "1"])
            with lstm_server(model_dir, *flags) as server:
                for load in big_loads:
                    before = batch_counters(server)
                    steps, _, errors = throughput(server.target, BIG, load, args.seconds)
                    batch = mean_batch(server, before)
                    big[(load, batching)] = steps
                    state = "on" if batching else "off"
                    target = "mean batch >= 16" if batching and load.sessions == 256 else ""
                    label = (
                        f"H=512, {load.label()}, batching {state}: steps/s (mean batch {batch:.1f}, errors {errors})"
                    )
                    emit(Row(label, steps, "steps/s", big_echo[load], target))
        for load in big_loads:
            gain = big[(load, True)] / max(big[(load, False)], 1e-9)
            emit(
                Row(
                    f"H=512, {load.label()}: batching on / off", gain, "x", None, ">= 2" if load.sessions == 256 else ""
                )
            )

        # 4. short steps while other clients send long requests, long requests off the loop (default) and on it
        off = long_requests.short_step_latency(model_dir, DEMO)
        on_loop = ("--inline-max-steps", str(10 * long_requests.LONG_STEPS))
        on = long_requests.short_step_latency(model_dir, DEMO, *on_loop, calls=40)  # ~0.4 s a call: keep it short
        mix = f"{long_requests.LONG_CLIENTS} clients sending {long_requests.LONG_STEPS}-step Predicts"
        for q in ("p50", "p99"):
            label = f"short Step {q} while {mix}: long requests in compute threads / on the event loop"
            emit(Row(label, off[f"{q}_us"], "us", on[f"{q}_us"], "p99 < on the loop" if q == "p99" else ""))

        # 5. memory and start-up
        mem = memory_per_session(model_dir, args.sessions_for_memory)
        emit(Row("state per session (2 L H 4 bytes, demo)", mem["state_bytes"], "B"))
        n = args.sessions_for_memory
        emit(
            Row(
                f"RSS per idle session ({n:,} sessions)",
                mem["idle_per_session"],
                "B",
                None,
                f"<= {mem['target']:.0f} B",
            )
        )
        emit(
            Row(
                f"RSS per session after one step ({n:,})",
                mem["stepped_per_session"],
                "B",
                None,
                f"<= {mem['target']:.0f} B",
            )
        )
        startup = statistics.median(time_to_serving(model_dir) for _ in range(3))
        emit(Row("process start to health SERVING (demo)", startup * 1e3, "ms"))

    backend_lines = backends.markdown()
    print("\n".join(backend_lines))
    return rows, backend_lines


def write_report(rows: list[Row], args: argparse.Namespace, backend_lines: list[str], cluster_lines: list[str]) -> None:
    cpu = cpu_model()
    versions = ", ".join(f"{p} {version(p)}" for p in ("grpcio", "protobuf", "numpy", "onnxruntime"))
    lines = [
        "# Performance",
        "",
        "Measured by `make bench` (bench/run.py) in one run: every lstm-serve figure beside the same load against",
        "`bench/echo_server.py`, a grpc.aio server with the same protos whose Step/StreamSteps echo the inputs (the",
        "framework's ceiling). Servers are separate processes; the load generator (lstm-loadtest's engine) shares the",
        f"machine, so client and server compete for the {os.cpu_count()} cores. Each throughput run lasts",
        f"{args.seconds:g} s. Ratios are lstm-serve steps/s over echo messages/s (for latency: over echo latency).",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {versions}.",
        f"Run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| scenario | lstm-serve | echo ceiling | ratio | target |",
        "| --- | --- | --- | --- | --- |",
        *(fmt_row(r) for r in rows),
        "",
        "Models: demo = `models/elnino` (I=1, 2 x LSTM(32), O=1, computed on the event loop);",
        "H=512 = I=16, 1 x LSTM(512), O=8, random weights (computed in one compute thread, BLAS pinned to 1 thread).",
        "Batching off = `--max-batch 1`.",
        "",
        *backend_lines,
        *cluster_lines,
        *NOTES,
    ]
    (REPO / "docs" / "performance.md").write_text("\n".join(lines))
    print("wrote docs/performance.md")


if __name__ == "__main__":
    main()
