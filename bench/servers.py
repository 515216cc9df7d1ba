"""Starts the servers under test as separate processes on loopback, as they run in production."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def _process(argv: list[str], pattern: str, stream: str) -> Iterator[int]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        pipe = proc.stdout if stream == "stdout" else proc.stderr
        assert pipe is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = pipe.readline()
            if not line:
                raise RuntimeError(f"{argv[2:4]} exited: {proc.stderr.read() if proc.stderr else ''}")
            if m := re.search(pattern, line):
                yield int(m.group(1))
                break
        else:
            raise TimeoutError(f"{argv} did not start in 60 s")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def echo_server() -> Iterator[int]:
    with _process([sys.executable, "-m", "bench.echo_server"], r"^port (\d+)", "stdout") as port:
        yield port


@contextmanager
def lstm_server(model_dir: Path, *flags: str) -> Iterator[int]:
    argv = [sys.executable, "-m", "lstm_serve.cli", "serve", "--port", "0", "--metrics-port", "-1"]
    argv += ["--model-dir", str(model_dir), "--log-level", "WARNING", *flags]
    # WARNING hides the "serving" line; ask for it explicitly through INFO on the app logger only
    argv[argv.index("WARNING")] = "INFO"
    with _process(argv, r"serving \d+ model\(s\) .* on [\d.]+:(\d+),", "stderr") as port:
        yield port
