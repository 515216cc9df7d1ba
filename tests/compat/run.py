"""`make client-compat`: lstm-client installed, in fresh venvs, with the dependency versions its users have.

- lowest:  the lowest protobuf, grpcio, grpcio-status and numpy client/pyproject.toml allows;
- highest: the newest of each that pip finds (protobuf below 8);
- triton:  lstm-client beside tritonclient[grpc] in one venv (pip resolves both, `pip check` is clean, both import).

In each, tests/compat/test_client_compat.py runs against one lstm-serve subprocess started from this (the main) venv,
so the server's own versions stay fixed and only the client's change. Each venv is installed by pip from ./client, so a
range in client/pyproject.toml that excludes the versions asked for fails the install. Venvs go under .client-compat/
(gitignored) and are made anew each run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.procs import LstmServeProcess
from tests.servers import model_repository

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / ".client-compat"
TEST = "tests/compat/test_client_compat.py"
TEST_TOOLS = ["pytest>=8.0", "pytest-asyncio>=0.24", "pytest-timeout>=2.3"]
ENVS: dict[str, list[str]] = {
    "lowest": ["protobuf==5.26.1", "grpcio==1.63.2", "grpcio-status==1.63.2", "numpy==1.26.4"],
    "highest": ["--upgrade", "protobuf", "grpcio", "grpcio-status", "numpy"],
    "triton": ["tritonclient[grpc]"],
}
INSTALL_TIMEOUT = 600.0  # seconds for one venv's pip install
TEST_TIMEOUT = 300.0


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        sys.stdout.write(done.stdout + done.stderr)
        raise SystemExit(f"client-compat: failed ({done.returncode}): {' '.join(argv)}")
    return done.stdout


def make_venv(name: str, requirements: list[str]) -> Path:
    venv = ROOT / name
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)], 120)
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--quiet", "./client", *requirements, *TEST_TOOLS], INSTALL_TIMEOUT)
    run([str(python), "-m", "pip", "check"], 120)
    return python


VERSIONS = """
import importlib.metadata as m
for name in ("protobuf", "grpcio", "grpcio-status", "numpy", "tritonclient"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        pass
"""


def versions(python: Path) -> str:
    return ", ".join(run([str(python), "-c", VERSIONS], 60).strip().splitlines())


def main() -> None:
    started = time.monotonic()
    ROOT.mkdir(exist_ok=True)
    models = model_repository(Path(tempfile.mkdtemp(prefix="compat-models-")))
    with LstmServeProcess(models) as server:
        for name, requirements in ENVS.items():
            t0 = time.monotonic()
            python = make_venv(name, requirements)
            # -W error: the generated code must import without a warning on these versions
            run([str(python), "-W", "error", "-c", "import lstm_client, lstm_client.aio"], 60)
            if name == "triton":
                run([str(python), "-W", "error", "-c", "import tritonclient.grpc, lstm_client"], 60)
            env = os.environ | {"LSTM_COMPAT_TARGET": server.target}
            pytest = [str(python), "-m", "pytest", TEST, "--noconftest", "-p", "no:cacheprovider", "-q"]
            out = run(pytest, TEST_TIMEOUT, env)
            summary = out.strip().splitlines()[-1]
            print(f"client-compat {name}: {versions(python)}: {summary} ({time.monotonic() - t0:.0f} s)", flush=True)
    shutil.rmtree(models, ignore_errors=True)
    print(f"client-compat: all passed in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
