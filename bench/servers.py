"""Starts the servers under test as separate processes on loopback, as they run in production."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    metrics_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def metric_sum(self, name: str) -> float:
        """Sum of every sample of `name` on the server's /metrics."""
        return metric_sum(f"http://127.0.0.1:{self.metrics_port}/metrics", name)


def metric_sum(url: str, name: str) -> float:
    """Sum of every sample of `name` on a Prometheus endpoint."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


@contextmanager
def _process(argv: list[str], pattern: str, stream: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    environ = None if env is None else os.environ | env
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=environ)
    try:
        pipe = proc.stdout if stream == "stdout" else proc.stderr
        assert pipe is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = pipe.readline()
            if not line:
                raise RuntimeError(f"{argv[2:4]} exited: {proc.stderr.read() if proc.stderr else ''}")
            if m := re.search(pattern, line):
                ports = [int(g) for g in m.groups() if g]
                threading.Thread(target=_drain, args=(pipe,), daemon=True).start()
                yield Server(proc, *ports)
                break
        else:
            raise TimeoutError(f"{argv} did not start in 60 s")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _drain(pipe: IO[str]) -> None:
    """Keeps reading the server's output so that a full pipe never blocks it."""
    for _ in pipe:
        pass


@contextmanager
def echo_server(input_size: int = 1) -> Iterator[Server]:
    argv = [sys.executable, "-m", "bench.echo_server", "--input-size", str(input_size)]
    with _process(argv, r"^port (\d+)", "stdout") as server:
        yield server


def lstm_serve_argv(model_dir: Path, *flags: str) -> list[str]:
    argv = [sys.executable, "-m", "lstm_serve.cli", "serve", "--port", "0", "--metrics-port", "0"]
    return [*argv, "--model-dir", str(model_dir), "--max-sessions", "1000000", *flags]


@contextmanager
def lstm_server(model_dir: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """`env`: variables added to this process's environment for the server (e.g. LSTM_SERVE_METRICS=off)."""
    pattern = r"serving \d+ model\(s\) .* on [\d.]+:(\d+), metrics on [\d.]+:(\d+)"
    with _process(lstm_serve_argv(model_dir, *flags), pattern, "stderr", env) as server:
        yield server
