"""The npz loader refuses every broken file with a message that names the problem."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lstm_serve.engine.npz import load_npz, save_npz
from lstm_serve.errors import ModelLoadError
from tests.golden import FIXTURES

Arrays = dict[str, np.ndarray]


def _arrays() -> Arrays:
    with np.load(FIXTURES / "golden_l3_head.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _write(tmp_path: Path, arrays: Arrays) -> Path:
    path = tmp_path / "m.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _drop(key: str) -> Callable[[Arrays], None]:
    def edit(a: Arrays) -> None:
        del a[key]

    return edit


def _set(key: str, value: object) -> Callable[[Arrays], None]:
    def edit(a: Arrays) -> None:
        a[key] = np.asarray(value)

    return edit


def _nan_in(key: str) -> Callable[[Arrays], None]:
    def edit(a: Arrays) -> None:
        a[key] = a[key].copy()
        a[key].flat[3] = np.nan

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop("meta.format_version"), "missing key meta.format_version"),
        (_set("meta.format_version", 2), "unknown format version"),
        (_drop("lstm.1.W_hh"), "missing key lstm.1.W_hh"),
        (_set("lstm.0.W_ih", np.zeros((24, 4), np.float32)), "lstm.0.W_ih has shape (24, 4), expected (32, 4)"),
        (_set("lstm.2.b_ih", np.zeros(31, np.float32)), "lstm.2.b_ih has shape (31,), expected (32,)"),
        (_set("head.W", np.zeros((2, 9), np.float32)), "head.W has shape (2, 9), expected (2, 8)"),
        (_nan_in("lstm.1.W_ih"), "lstm.1.W_ih contains NaN or Inf"),
        (_set("head.b", np.array([1.0, np.inf], np.float32)), "head.b contains NaN or Inf"),
        (_set("lstm.0.W_hx", np.zeros(1, np.float32)), "unknown keys ['lstm.0.W_hx']"),
        (_drop("head.W"), "missing key head.W"),
        (_set("lstm.0.W_hh", np.zeros((32, 8), np.int32)), "lstm.0.W_hh has dtype int32"),
        (_set("meta.input_mean", np.zeros(4, np.float32)), "normalization needs all four"),
        (_set("meta.input_features", np.array(["a", "b"])), "2 input feature names for input_size 4"),
    ],
)
def test_broken_files_are_refused_with_the_reason(tmp_path: Path, edit: Callable[[Arrays], None], message: str) -> None:
    arrays = _arrays()
    edit(arrays)
    with pytest.raises(ModelLoadError) as err:
        load_npz(_write(tmp_path, arrays))
    assert message in str(err.value)


def test_layers_must_be_numbered_without_gaps(tmp_path: Path) -> None:
    arrays = _arrays()
    for name in ("W_ih", "W_hh", "b_ih", "b_hh"):
        arrays[f"lstm.5.{name}"] = arrays.pop(f"lstm.2.{name}")
    with pytest.raises(ModelLoadError, match=r"numbered 0..L-1, found \[0, 1, 5\]"):
        load_npz(_write(tmp_path, arrays))


def test_truncated_file(tmp_path: Path) -> None:
    data = (FIXTURES / "golden_l3_head.npz").read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a readable npz file"):
        load_npz(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_npz(tmp_path / "absent.npz")


def test_pickled_object_arrays_are_never_loaded(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["meta.input_features"] = np.array([{"evil": 1}, None, 1, 2], dtype=object)
    path = tmp_path / "pickle.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(
        ModelLoadError, match=r"meta\.input_features holds Python objects: pickled data is never loaded"
    ):
        load_npz(path)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    weights = load_npz(FIXTURES / "golden_l3_head.npz")
    save_npz(weights, tmp_path / "copy.npz")
    again = load_npz(tmp_path / "copy.npz")
    assert (again.input_size, again.hidden_size, again.num_layers, again.output_size) == (4, 8, 3, 2)
    for a, b in zip(weights.layers, again.layers, strict=True):
        np.testing.assert_array_equal(a.W_ih, b.W_ih)
        np.testing.assert_array_equal(a.b_hh, b.b_hh)
