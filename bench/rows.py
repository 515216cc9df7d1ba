"""What every section of `make bench` shares: the load shapes, a table row, a bounded run of the load generator."""

from __future__ import annotations

import asyncio
import platform
from dataclasses import dataclass
from pathlib import Path

from lstm_client.loadtest import LoadConfig, LoadResult, run_load

DEMO = "elnino"


@dataclass(frozen=True)
class Load:
    mode: str
    sessions: int
    per_stream: int = 1
    steps_per_message: int = 1
    per_message: int = 1  # sessions whose steps share a message (StepMany, or many-session stream requests)

    def label(self) -> str:
        how = f"stream, {self.per_stream}/stream" if self.mode == "stream" else "unary"
        many = f", {self.per_message} sessions/msg" if self.per_message > 1 else ""
        return f"{self.sessions} sessions, {how}, {self.steps_per_message} step/msg{many}"

    def config(self, target: str, model: str, seconds: float) -> LoadConfig:
        return LoadConfig(
            target=target,
            model=model,
            sessions=self.sessions,
            steps=10**9,  # the duration is the bound
            steps_per_message=self.steps_per_message,
            mode=self.mode,  # type: ignore[arg-type]
            sessions_per_stream=self.per_stream,
            sessions_per_message=self.per_message,
            duration=seconds,
        )


@dataclass
class Row:
    scenario: str
    value: float
    unit: str
    ceiling: float | None = None  # the figure it is compared with (echo, or the section's baseline)
    target: str = ""

    def ratio(self) -> float | None:
        return None if not self.ceiling else self.value / self.ceiling


def fmt_row(row: Row) -> str:
    ratio = row.ratio()
    ceiling = f"{row.ceiling:,.0f}" if row.ceiling else ""
    value = f"{row.value:.2f}" if row.unit == "x" or abs(row.value) < 10 else f"{row.value:,.0f}"
    shown = f"{value} {row.unit}".strip()
    shown_ratio = f"{ratio:.2f}" if ratio else ""
    return f"| {row.scenario} | {shown} | {ceiling} | {shown_ratio} | {row.target} |"


def summary(result: LoadResult) -> tuple[float, float, int]:
    """steps/s, messages/s and the error count of a finished run."""
    s = result.summary()
    return float(s["steps_per_s"]), float(s["messages_per_s"]), sum(result.errors.values())  # type: ignore[arg-type]


def throughput(target: str, model: str, load: Load, seconds: float) -> tuple[float, float, int]:
    """Returns steps/s, messages/s and the error count of a bounded run."""
    return summary(asyncio.run(run_load(load.config(target, model, seconds))))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if "model name" in line:
            return line.split(":", 1)[1].strip()
    return platform.processor()


def splice(document: str, section: list[str], before: str = "## Reading these figures") -> str:
    """The document with the section headed by section[0] replaced (or, the first time, inserted before `before`,
    else appended): `--only` runs rewrite their own section of docs/performance.md and leave the rest."""
    lines = document.splitlines()
    heading = section[0]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    elif before in lines:
        start = end = lines.index(before)
    else:
        start = end = len(lines)
        section = ["", *section]
    return "\n".join([*lines[:start], *section, *lines[end:]])
