"""Load-test accounting: counts, latencies, errors, and the final table or JSON."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from lstm_client.tensor import FloatArray


@dataclass
class SessionRecord:
    """What one session sent and received, kept only when verification is asked for."""

    session_id: str
    inputs: list[FloatArray] = field(default_factory=list)
    outputs: list[FloatArray] = field(default_factory=list)
    failed: bool = False


@dataclass
class LoadResult:
    started: float = field(default_factory=time.perf_counter)
    elapsed: float = 0.0
    steps: int = 0
    messages: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, one per answered message
    errors: Counter[str] = field(default_factory=Counter)  # by gRPC status code name, after the retries
    retries: int = 0  # calls resent and streams reopened (each after a failure the retry policy let pass)
    sessions: list[SessionRecord] = field(default_factory=list)
    verified: int = 0
    mismatched: int = 0

    def ok(self, steps: int, latency: float) -> None:
        self.steps += steps
        self.messages += 1
        self.latencies.append(latency)

    def retried(self, _exc: BaseException) -> None:
        self.retries += 1

    def summary(self) -> dict[str, object]:
        lat = np.array(self.latencies) * 1e3 if self.latencies else np.zeros(1)
        elapsed = max(self.elapsed, 1e-9)
        return {
            "elapsed_s": round(self.elapsed, 3),
            "steps": self.steps,
            "messages": self.messages,
            "steps_per_s": round(self.steps / elapsed, 1),
            "messages_per_s": round(self.messages / elapsed, 1),
            "latency_ms": {
                "p50": round(float(np.percentile(lat, 50)), 3),
                "p90": round(float(np.percentile(lat, 90)), 3),
                "p99": round(float(np.percentile(lat, 99)), 3),
                "max": round(float(lat.max()), 3),
            },
            "errors": dict(self.errors),
            "retries": self.retries,
            "verified_sessions": self.verified,
            "mismatched_sessions": self.mismatched,
        }

    def json(self, config: dict[str, object]) -> str:
        return json.dumps({"config": config, "result": self.summary()}, indent=2)

    def table(self, header: str) -> str:
        s = self.summary()
        lat = s["latency_ms"]
        assert isinstance(lat, dict)
        errors = ", ".join(f"{code}: {n}" for code, n in sorted(self.errors.items())) or "none"
        rows = [
            header,
            f"  duration      {s['elapsed_s']:.2f} s",
            f"  steps         {self.steps:>10,}   {s['steps_per_s']:>10,.0f} /s",
            f"  messages      {self.messages:>10,}   {s['messages_per_s']:>10,.0f} /s",
            f"  latency (ms)  p50 {lat['p50']:.2f}   p90 {lat['p90']:.2f}   "
            f"p99 {lat['p99']:.2f}   max {lat['max']:.2f}",
            f"  errors        {errors}",
            f"  retries       {self.retries:>10,}",
        ]
        if self.verified or self.mismatched:
            rows.append(f"  verified      {self.verified} sessions match Predict, {self.mismatched} do not")
        return "\n".join(rows)
