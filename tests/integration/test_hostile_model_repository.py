"""A model repository with one hostile entry of every kind beside the demo model: the server starts, serves the demo
model, lists each hostile entry as a failure with a short reason that names no server path, and logs the details."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from lstm_client import NotFound
from tests.golden import FIXTURES, REPO
from tests.servers import start_server, stop_server, test_settings
from tests.unit.test_model_files_hostile import (
    corrupt_extra_key_npz,
    external_data_onnx,
    huge_array_npz,
    npz_model_dir,
    onnx_model_dir,
    zeros_bomb_npz,
)

GOLDEN = FIXTURES / "golden_l1_nohead.npz"


def _hostile_repository(root: Path, outside: Path) -> dict[str, str]:
    """Writes the entries; returns, per directory, a word its public reason must contain."""
    shutil.copytree(REPO / "models" / "elnino", root / "elnino")
    npz_model_dir(root, "huge_array", "w.npz")
    huge_array_npz(root / "huge_array" / "w.npz")
    npz_model_dir(root, "extra_key", "w.npz")
    corrupt_extra_key_npz(root / "extra_key" / "w.npz")
    npz_model_dir(root, "zeros_bomb", "w.npz")
    zeros_bomb_npz(root / "zeros_bomb" / "w.npz", megabytes=16)
    npz_model_dir(root, "fifo", "w.npz")
    os.mkfifo(root / "fifo" / "w.npz")
    npz_model_dir(root, "device", "w.npz")
    (root / "device" / "w.npz").symlink_to("/dev/zero")  # outside, and not a regular file either
    npz_model_dir(root, "absolute", str(outside))
    npz_model_dir(root, "dotdot", "../../outside/w.npz")
    npz_model_dir(root, "symlink", "w.npz")
    (root / "symlink" / "w.npz").symlink_to(outside)
    for twin in ("twin_a", "twin_b"):
        npz_model_dir(root, twin, "w.npz", extra='name = "twin"\n')
        shutil.copyfile(GOLDEN, root / twin / "w.npz")
    npz_model_dir(root, "huge_toml", "w.npz")
    (root / "huge_toml" / "model.toml").write_text("#" * (2 << 20) + '\nweights = "w.npz"\n')
    (root / "latin1_toml").mkdir()
    (root / "latin1_toml" / "model.toml").write_bytes(b'description = "\xe9t\xe9"\nweights = "w.npz"\n')
    (root / "fifo_toml").mkdir()
    os.mkfifo(root / "fifo_toml" / "model.toml")
    onnx_fifo = onnx_model_dir(root, "onnx_fifo_data")
    external_data_onnx(onnx_fifo)
    (onnx_fifo / "weights.bin").unlink()
    os.mkfifo(onnx_fifo / "weights.bin")
    onnx_out = onnx_model_dir(root, "onnx_outside_data")
    external_data_onnx(onnx_out)
    (onnx_out / "weights.bin").rename(outside.parent / "weights.bin")
    (onnx_out / "weights.bin").symlink_to(outside.parent / "weights.bin")  # the data, through a link out of the dir
    return {
        "huge_array": "4 TiB",
        "extra_key": "unknown keys ['extra']",
        "zeros_bomb": "unknown keys ['zeros']",
        "fifo": "not a regular file (a FIFO)",
        "device": "outside the model directory",
        "absolute": "outside the model directory",
        "dotdot": "outside the model directory",
        "symlink": "outside the model directory",
        "twin_a": "name conflict with directory 'twin_b'",
        "twin_b": "name conflict with directory 'twin_a'",
        "huge_toml": "larger than the 1 MiB limit",
        "latin1_toml": "not UTF-8",
        "fifo_toml": "not a regular file (a FIFO)",
        "onnx_fifo_data": "ONNX external data file: not a regular file (a FIFO)",
        "onnx_outside_data": "ONNX external data file: outside the model directory",
    }


@pytest.mark.timeout(120)
def test_hostile_entries_fail_alone_with_short_reasons(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outside = tmp_path / "outside" / "w.npz"
    outside.parent.mkdir()
    shutil.copyfile(GOLDEN, outside)
    root = tmp_path / "models"
    root.mkdir()
    expected = _hostile_repository(root, outside)

    with caplog.at_level(logging.INFO, logger="lstm_serve"):
        running, handle = start_server(test_settings(root))
        try:
            with running.client() as client:
                models, failures = client.list_models_with_failures()
                with client.create_session("elnino") as session:
                    assert session.step([26.0]).shape == (1,)
                with pytest.raises(NotFound, match="model 'fifo' failed to load: weights file: not a regular") as err:
                    client.get_model("fifo")
                assert str(tmp_path) not in str(err.value)
        finally:
            stop_server(running, handle)

    assert [m.name for m in models] == ["elnino"]
    reasons = {f.name: f.error for f in failures}
    assert set(reasons) == set(expected)
    for name, word in expected.items():
        assert word in reasons[name], (name, reasons[name])
        assert "/" not in reasons[name], (name, reasons[name])
        assert "\n" not in reasons[name]
    logged = {r.model: r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and hasattr(r, "model")}
    for name in expected:
        assert str(root / name) in logged[name], (name, logged.get(name))
