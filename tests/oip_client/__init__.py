"""tritonclient, run from its own environment (see driver.py): `drive` sends it a plan and returns its results."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tests.golden import REPO

HERE = Path(__file__).resolve().parent
VENV = REPO / ".venv-tritonclient"
DRIVER = HERE / "driver.py"
INSTALL_TIMEOUT = 600.0
DRIVE_TIMEOUT = 120.0


def python() -> Path:
    """The tritonclient environment's interpreter; made with `make tritonclient-venv` (pip, from the package index)
    when it is missing, as `make test` does first."""
    stamp = VENV / ".installed"
    if not stamp.exists():
        done = subprocess.run(
            ["make", "--no-print-directory", "tritonclient-venv"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            message = f"cannot install tritonclient into {VENV}: {done.stderr[-2000:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return VENV / "bin" / "python"


def tensor(x: npt.ArrayLike) -> dict[str, Any]:
    a = np.ascontiguousarray(x, dtype=np.float32)
    return {"shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


def array(result: dict[str, Any]) -> npt.NDArray[np.float32]:
    """The output of an infer result, exactly as tritonclient's as_numpy gave it."""
    assert "error" not in result, result
    data = np.frombuffer(base64.b64decode(result["data"]), dtype=np.float32)
    return data.reshape(result["shape"])


def drive(target: str, ops: list[dict[str, Any]]) -> list[Any]:
    """Runs the operations (see driver.py) with tritonclient against `target`, one after another."""
    done = subprocess.run(
        [str(python()), str(DRIVER)],
        input=json.dumps({"target": target, "ops": ops}),
        capture_output=True,
        text=True,
        timeout=DRIVE_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"tritonclient driver failed:\n{done.stderr[-4000:]}"
    results: list[Any] = json.loads(done.stdout)
    return results
