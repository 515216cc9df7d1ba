"""A --snapshot that cannot be written stops the start with one line. (It was found out only at shutdown, "the
sessions are lost", after the server had served promising that a restart loses nothing.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from lstm_serve.app import StartupError
from tests.golden import FIXTURES, write_model_dir
from tests.servers import start_server, test_settings


def test_unwritable_snapshot_path_is_refused_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_model_dir(models, "m", FIXTURES / "golden_l1_nohead.npz")
    snapshot = tmp_path / "no-such-dir" / "sessions.snap"  # (as root, a read-only dir is writable: use a missing one)
    settings = test_settings(models, snapshot=snapshot, snapshot_interval=0)
    with pytest.raises(RuntimeError) as err:  # was: served, and lost every session at shutdown
        start_server(settings)
    assert isinstance(err.value.__cause__, StartupError)
    assert "cannot write the snapshot" in str(err.value.__cause__)
