"""`make bench` section "The server's own cost": each server pinned to its own core(s), the load generator to another,
and the server's CPU time per message read from /proc over the run, for the echo ceiling and lstm-serve alike.

Throughput alone mixes the server's cost with the load generator's when both share the cores; CPU per message is
the server's own, and what sizing a deployment needs.

The metrics' own cost is measured the same way: the stream load against a server with metrics on and one with
LSTM_SERVE_METRICS=off (every lstm_*/grpc_* series a no-op): fresh servers, each warmed up by a short run, metrics
off and on alternated to spread the machine's drift over both.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from bench.measure import ALL_CPUS, Placement, cpu_seconds, pin
from bench.rows import DEMO, Load, Row, fmt_row, summary
from bench.servers import echo_server, lstm_server
from lstm_client.loadtest import run_load

SECTION = "## The server's own cost: pinned, CPU per message"
SINGLE = [Load("unary", 64), Load("stream", 64)]
METRICS_LOAD = SINGLE[1]  # the main path: per-request stream latency, per-message grpc counters, batch timings
MANY = [Load("unary", 64, per_message=64), Load("stream", 64, per_stream=64, per_message=64)]


@dataclass(frozen=True)
class Cost:
    messages_per_s: float
    steps_per_s: float
    cpu_us_per_message: float
    cpu_us_per_step: float
    errors: int


def _cost(pid: int, target: str, load: Load, seconds: float) -> Cost:
    """One bounded run; the server's CPU over all of it (its 64 session creations and closes are a rounding error
    next to the thousands of messages)."""
    before = cpu_seconds([pid])
    result = asyncio.run(run_load(load.config(target, DEMO, seconds)))
    used = cpu_seconds([pid]) - before
    steps_per_s, messages_per_s, errors = summary(result)
    messages = max(result.messages, 1)
    return Cost(messages_per_s, steps_per_s, 1e6 * used / messages, 1e6 * used / max(result.steps, 1), errors)


def run(model_dir: Path, seconds: float, placement: Placement) -> tuple[list[Row], str]:
    rows: list[Row] = []
    pin([os.getpid()], placement.client)
    try:
        echo: dict[Load, Cost] = {}
        with echo_server(input_size=1) as server:
            pin([server.proc.pid], placement.servers)
            for load in SINGLE:
                echo[load] = _cost(server.proc.pid, server.target, load, seconds)
        ours: dict[Load, Cost] = {}
        with lstm_server(model_dir, "--models", DEMO) as server:
            pin([server.proc.pid], placement.servers)
            for load in SINGLE + MANY:
                ours[load] = _cost(server.proc.pid, server.target, load, seconds)
        metrics_on: list[Cost] = []
        metrics_off: list[Cost] = []
        for enabled in (False, True, False, True):  # fresh servers alike, each warmed up by a short run first
            with lstm_server(model_dir, "--models", DEMO, env={"LSTM_SERVE_METRICS": "on" if enabled else "off"}) as s:
                pin([s.proc.pid], placement.servers)
                _cost(s.proc.pid, s.target, METRICS_LOAD, 1.0)
                (metrics_on if enabled else metrics_off).append(_cost(s.proc.pid, s.target, METRICS_LOAD, seconds))
    finally:
        pin([os.getpid()], ALL_CPUS)
    for load in SINGLE:
        e, o = echo[load], ours[load]
        rows.append(
            Row(
                f"pinned, {load.label()}: server CPU per message (errors {o.errors})",
                o.cpu_us_per_message,
                "us",
                e.cpu_us_per_message,
                "<= 1.3 x echo",
            )
        )
        target = ">= 0.9 x echo" if load.mode == "stream" else ""
        rows.append(Row(f"pinned, {load.label()}: messages/s", o.messages_per_s, "msg/s", e.messages_per_s, target))
    for load, base in zip(MANY, SINGLE, strict=True):
        e, o = echo[base], ours[load]
        rows.append(
            Row(
                f"pinned, {load.label()}: server CPU per step (errors {o.errors})",
                o.cpu_us_per_step,
                "us",
                e.cpu_us_per_message,
            )
        )
        rows.append(
            Row(
                f"pinned, {load.label()}: steps/s over echo's {base.mode} msg/s",
                o.steps_per_s,
                "steps/s",
                e.messages_per_s,
                ">= 20 x echo msg/s",
            )
        )
    rows.append(_metrics_cost(metrics_on, metrics_off))
    return rows, placement.describe()


def markdown(rows: list[Row], where: str) -> list[str]:
    return [
        SECTION,
        "",
        f"Each server alone on its core(s), the load generator on another ({where}); the server's user + system CPU",
        "time from /proc over each run, divided by the messages it answered. The echo server is the ceiling: what",
        "grpc.aio itself costs per message. A many-sessions message (StepMany, or a stream request carrying 64",
        "sessions' steps) is counted per step and compared with echo's cost per message of the same kind of call.",
        "",
        "| scenario | lstm-serve | echo ceiling | ratio | target |",
        "| --- | --- | --- | --- | --- |",
        *(fmt_row(r) for r in rows),
        "",
    ]


def _metrics_cost(on: list[Cost], off: list[Cost]) -> Row:
    def mean(costs: list[Cost]) -> float:
        return sum(c.cpu_us_per_message for c in costs) / len(costs)

    errors = sum(c.errors for c in on + off)
    return Row(
        f"pinned, {METRICS_LOAD.label()}: server CPU per message with metrics, vs LSTM_SERVE_METRICS=off "
        f"(mean of {len(on)} runs each, errors {errors})",
        mean(on),
        "us",
        mean(off),
        "<= 1.05 x off",
    )
