"""The framework fixtures of tests/fixtures/frameworks (made by make_framework_goldens.py with PyTorch, Keras and
ONNX Runtime; none of them is needed here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.golden import FIXTURES

FRAMEWORKS = FIXTURES / "frameworks"
CASES = ("fw_l1_nohead", "fw_l3_head", "fw_l2_wide")


@dataclass(frozen=True)
class FrameworkIO:
    x: np.ndarray  # (B, T, I)
    h0: np.ndarray  # (L, B, H)
    c0: np.ndarray
    torch_y: np.ndarray  # PyTorch from (h0, c0)
    torch_hn: np.ndarray
    torch_cn: np.ndarray
    torch_y0: np.ndarray  # PyTorch from zeros
    keras_y0: np.ndarray  # Keras from zeros
    ort_legacy_y: np.ndarray
    ort_dynamo_y: np.ndarray


def framework_io(case: str) -> FrameworkIO:
    with np.load(FRAMEWORKS / f"{case}.io.npz") as io:
        return FrameworkIO(**{k: io[k] for k in io.files})


def source(case: str, suffix: str) -> Path:
    return FRAMEWORKS / f"{case}{suffix}"
