"""docs/clients.md, run: a generic reflection client (buf curl, standing in for grpcurl, which is not packaged here)
and the Node.js client of docs/examples/node hold a whole session against a real server, and get the same outputs,
bit for bit, as the Python client."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from lstm_client import Client
from tests.procs import require
from tests.servers import RunningServer

REPO = Path(__file__).resolve().parents[2]
NODE_EXAMPLE = REPO / "docs" / "examples" / "node"
BUF = Path(sys.executable).parent / "buf"  # requirements-dev.txt's buf-bin
MODEL = "golden_l3_head"  # 4 input features
STEPS = np.random.default_rng(11).normal(size=(6, 4)).astype("<f4")


def _python_outputs(server: RunningServer) -> list[bytes]:
    with server.client() as client, client.create_session(MODEL) as session:
        return [np.asarray(session.step(x), "<f4").tobytes() for x in STEPS]


def _buf_curl(
    server: RunningServer, method: str, body: Mapping[str, object], *extra: str
) -> subprocess.CompletedProcess[str]:
    argv = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", *extra, "-d", json.dumps(body)]
    argv.append(f"http://{server.target}/lstm.v1.LstmService/{method}")
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=REPO)


@pytest.mark.parametrize("schema", [(), ("--schema", "proto")], ids=["reflection", "proto-files"])
def test_a_session_from_a_generic_client(server: RunningServer, schema: tuple[str, ...]) -> None:
    """What docs/clients.md shows with grpcurl, done with buf curl: JSON in and out, tensors as base64."""
    want = _python_outputs(server)
    sid = f"buf-curl-{len(schema)}"
    created = _buf_curl(server, "CreateSession", {"model": MODEL, "session_id": sid}, *schema)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["sessionId"] == sid
    for seq, x in enumerate(STEPS, 1):
        tensor = {"shape": [4], "data": base64.b64encode(x.tobytes()).decode()}
        reply = _buf_curl(server, "Step", {"session_id": sid, "seq": str(seq), "inputs": tensor}, *schema)
        assert reply.returncode == 0, reply.stderr
        step = json.loads(reply.stdout)
        assert step["seq"] == str(seq)  # uint64 in JSON: a string
        assert base64.b64decode(step["outputs"]["data"]) == want[seq - 1]
    wrong = {
        "session_id": sid,
        "seq": "99",
        "inputs": {"shape": [4], "data": base64.b64encode(STEPS[0].tobytes()).decode()},
    }
    refused = _buf_curl(server, "Step", wrong, *schema)
    assert refused.returncode != 0
    error = json.loads(refused.stderr)
    assert error["code"] == "failed_precondition"
    assert [d["type"] for d in error["details"]][:1] == ["google.rpc.ErrorInfo"]
    info = _buf_curl(server, "GetServerInfo", {}, *schema)
    assert json.loads(info.stdout)["limits"]["maxStepsPerRequest"] == 512


def test_the_node_example_matches_the_python_client(server: RunningServer) -> None:
    node = require("node")
    if not (NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        message = "docs/examples/node has no node_modules: run `npm ci --prefix docs/examples/node`"
        if os.environ.get("CI") == "true":  # .ci/run installs them
            pytest.fail(message)
        pytest.skip(message)
    want = _python_outputs(server)
    done = subprocess.run(
        [node, str(NODE_EXAMPLE / "client.js"), server.target, MODEL, json.dumps(STEPS.tolist())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert (got["protocol"], got["max_steps_per_request"]) == ("lstm.v1", 512)
    assert [base64.b64decode(o) for o in got["outputs"]] == want  # JSON floats would round: compared as bytes
    assert got["results"] == ["outputs"] * 3  # the StepReply oneof, as Node sees it
    assert got["final_seq"] == "6"
    refused = got["refused"]
    assert (refused["grpc_code"], refused["reason"], refused["domain"]) == (9, "seq_mismatch", "lstm-serve")
    assert refused["metadata"]["expected_seq"] == "4"


def test_python_reference_is_deterministic(client: Client) -> None:
    """The comparisons above assume one input gives one output bit for bit, on fresh sessions."""
    with client.create_session(MODEL) as a, client.create_session(MODEL) as b:
        assert np.asarray(a.step(STEPS[0])).tobytes() == np.asarray(b.step(STEPS[0])).tobytes()


def test_reflection_serves_the_types_of_the_error_details(server: RunningServer) -> None:
    """So that grpcurl, which resolves the Any details of a status by reflection, prints them decoded."""
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        files = {symbol: database.FindFileContainingSymbol(symbol).name for symbol in REFLECTED}
    assert files == REFLECTED


REFLECTED = {
    "lstm.v1.GetServerInfoResponse": "lstm/v1/lstm.proto",
    "google.rpc.ErrorInfo": "google/rpc/error_details.proto",
    "google.rpc.BadRequest": "google/rpc/error_details.proto",
    "google.rpc.Status": "google/rpc/status.proto",
}
