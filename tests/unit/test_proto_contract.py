"""The proto checks of `make lint` can fail: buf breaking (buf.yaml, against proto/lstm/v1/released.binpb, the image of
the last release) refuses each change that breaks a deployed client, and buf lint an RPC without a comment."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUF = Path(sys.executable).parent / "buf"  # requirements-dev.txt's buf-bin
RELEASED = REPO / "proto" / "lstm" / "v1" / "released.binpb"

BREAKING = {
    "renumbered field": ("  bytes data = 2;", "  bytes data = 5;", "FIELD_NO_DELETE_UNLESS_NUMBER_RESERVED"),
    "retyped field": ("  uint64 seq = 2 [jstype = JS_STRING];", "  uint32 seq = 2;", "FIELD_WIRE_JSON_COMPATIBLE_TYPE"),
    "removed field": ("  repeated string output_features = 10;\n", "", "FIELD_NO_DELETE"),
    "removed RPC": ("  rpc Predict(PredictRequest) returns (PredictResponse);\n", "", "RPC_NO_DELETE"),
    "streaming changed": (
        "rpc StreamSteps(stream StepRequest)",
        "rpc StreamSteps(StepRequest)",
        "RPC_SAME_CLIENT_STREAMING",
    ),
    "renamed field": (
        "  string session_id = 1;\n  // The session's next",
        "  string id = 1;\n  // The session's next",
        "FIELD_SAME_NAME",
    ),
}


def _workspace(tmp_path: Path, old: str = "", new: str = "") -> Path:
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    proto = tmp_path / "proto" / "lstm" / "v1" / "lstm.proto"
    text = proto.read_text()
    if old:
        assert old in text, f"the mutation no longer applies: {old!r}"
        proto.write_text(text.replace(old, new, 1))
    return tmp_path


def _buf(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_the_proto_as_it_is_passes(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path)
    for args in (("lint",), ("breaking", "--against", str(RELEASED))):
        done = _buf(workspace, *args)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("change", list(BREAKING))
def test_a_breaking_change_fails(tmp_path: Path, change: str) -> None:
    old, new, rule = BREAKING[change]
    done = _buf(_workspace(tmp_path, old, new), "breaking", "--against", str(RELEASED), "--error-format", "json")
    assert done.returncode != 0, f"{change} passed the breaking check"
    assert rule in done.stdout, done.stdout + done.stderr


def test_an_rpc_without_a_comment_fails_lint(tmp_path: Path) -> None:
    rpc = "  rpc GetServerInfo(GetServerInfoRequest) returns (GetServerInfoResponse);\n"
    workspace = _workspace(tmp_path, rpc, rpc + "  rpc Ping(GetServerInfoRequest) returns (GetServerInfoResponse);\n")
    done = _buf(workspace, "lint")
    assert done.returncode != 0
    assert "Ping" in done.stdout
