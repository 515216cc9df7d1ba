"""--snapshot with model versions: sessions come back pinned to the version they were created on (format 2), a
version no longer served after the restart ends its sessions as `model_retired`, and a format-1 file (written before
versions) is still read, its sessions pinned to version 1."""

from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from lstm_client import SessionGone
from lstm_serve.sessions import snapshot as snapshots
from tests.integration.test_model_lifecycle import ATOL, Reference, versions, write_version
from tests.servers import start_server, stop_server, test_settings


def _serve(models: Path, snapshot: Path, **overrides: object):  # type: ignore[no-untyped-def]
    return start_server(test_settings(models, snapshot=snapshot, snapshot_interval=0, **overrides))


def test_sessions_come_back_on_their_versions(tmp_path: Path) -> None:
    models, snapshot = tmp_path / "models", tmp_path / "s.snap"
    v1, v2 = write_version(models / "m", None, 1.0), write_version(models / "m", 2, 0.5)
    refs = {"s1": Reference(v1), "s2": Reference(v2)}
    x = np.linspace(-1, 1, 4, dtype=np.float32)
    server, handle = _serve(models, snapshot, version_policy="all")
    try:
        with server.client() as client:
            for sid, version in (("s1", 1), ("s2", 2)):
                session = client.create_session("m", session_id=sid, model_version=version)
                np.testing.assert_allclose(session.step(x), refs[sid].step(x), atol=ATOL)
    finally:
        stop_server(server, handle)
    read = snapshots.read(snapshot)
    assert {(s.id, s.version) for s in read.sessions} == {("s1", 1), ("s2", 2)}
    assert set(read.models) == {("m", 1), ("m", 2)}
    server, handle = _serve(models, snapshot, version_policy="all")
    try:
        with server.client() as client:
            for sid, version in (("s1", 1), ("s2", 2)):
                session = client.session(sid)
                assert session.info().model_version == version
                np.testing.assert_allclose(session.step(x), refs[sid].step(x), atol=ATOL)  # the state came back
    finally:
        stop_server(server, handle)
    server, handle = _serve(models, snapshot)  # latest:1: version 1 is loaded only for the session pinned to it
    try:
        with server.client() as client:
            np.testing.assert_allclose(client.session("s1").step(x), refs["s1"].step(x), atol=ATOL)
            assert versions(client) == {1: ("unloading", False), 2: ("ready", True)}
            np.testing.assert_allclose(client.session("s2").step(x), refs["s2"].step(x), atol=ATOL)
    finally:
        stop_server(server, handle)
    for flat in ("model.toml", "m.npz"):  # version 1 (the flat layout) leaves the repository
        (models / "m" / flat).unlink()
    server, handle = _serve(models, snapshot)
    try:
        with server.client() as client:
            with pytest.raises(SessionGone) as gone:
                client.session("s1").step(x)
            assert gone.value.reason == "model_retired"
            np.testing.assert_allclose(client.session("s2").step(x), refs["s2"].step(x), atol=ATOL)
    finally:
        stop_server(server, handle)


def _format_1(path: Path, session_id: str, model: str, record: bytes, shape: list[int], outputs: int) -> None:
    """A snapshot as servers before versions wrote it (the layout in sessions/snapshot.py, format 1)."""
    now = time.time()
    header = json.dumps({"written": now, "models": {model: [shape, outputs]}, "sessions": 1, "ended": 0}).encode()
    body = b"LSTMSNAP" + struct.pack("<HI", 1, len(header)) + header
    sid, name = session_id.encode(), model.encode()
    body += struct.pack("<HHIdddQQ", len(sid), len(name), len(record), now, now, 0.0, 0, 0) + sid + name + record
    path.write_bytes(body + hashlib.blake2b(body, digest_size=32).digest())


def test_a_format_1_snapshot_is_read_as_version_1(tmp_path: Path) -> None:
    models, snapshot = tmp_path / "models", tmp_path / "old.snap"
    v1 = write_version(models / "m", None, 1.0)
    zero = np.zeros((2, 3, 8), np.float32).tobytes()  # golden_l3_head: 3 layers of 8
    _format_1(snapshot, "old", "m", zero, [2, 3, 8], 2)
    [session] = snapshots.read(snapshot).sessions
    assert (session.id, session.model, session.version) == ("old", "m", 1)
    server, handle = _serve(models, snapshot)
    try:
        with server.client() as client:
            restored = client.session("old")
            x = np.ones(4, np.float32)
            np.testing.assert_allclose(restored.step(x), Reference(v1).step(x), atol=ATOL)
    finally:
        stop_server(server, handle)
    assert snapshot.read_bytes()[8:10] == struct.pack("<H", snapshots.VERSION)  # written back in the new format
