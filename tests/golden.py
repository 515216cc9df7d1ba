"""Access to the committed golden fixtures (see tests/fixtures/make_golden.py)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = FIXTURES.parent.parent
CASES = ("golden_l1_nohead", "golden_l3_head", "golden_l2_wide")
TOLERANCE = 1e-5

Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Golden:
    name: str
    weights: Path
    inputs: Array  # (B, T, I)
    h0: Array  # (L, B, H)
    c0: Array
    outputs: Array  # (B, T, O)
    hn: Array
    cn: Array


def golden(name: str) -> Golden:
    with np.load(FIXTURES / f"{name}.io.npz") as io:
        arrays = {k: io[k] for k in io.files}
    return Golden(name=name, weights=FIXTURES / f"{name}.npz", **arrays)


def write_model_dir(root: Path, name: str, weights: Path, backend: str = "numpy") -> Path:
    """A model repository entry with a copy of `weights`, named relatively in its model.toml: the server serves only
    files inside a model's directory. A `weights` that does not exist is named all the same (a broken model)."""
    directory = root / name
    directory.mkdir(parents=True)
    if weights.exists():
        shutil.copyfile(weights, directory / weights.name)
    (directory / "model.toml").write_text(f'version = "1"\nbackend = "{backend}"\nweights = "{weights.name}"\n')
    return directory
