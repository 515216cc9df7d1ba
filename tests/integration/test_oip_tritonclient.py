"""The Open Inference Protocol endpoint driven by the unmodified tritonclient[grpc] (from its own environment, see
tests/oip_client), as a Triton user would drive a stateful model: sync infer with sequence flags, a sequence streamed
with start_stream + async_stream_infer, is_model_ready, get_model_metadata. Every output is compared bit for bit with
what the lstm.v1 client gets for the same inputs, and with the committed PyTorch references."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lstm_client import Client
from lstm_serve._proto.inference import grpc_service_pb2 as pb
from lstm_serve.service.auth import token_hash
from tests.golden import FIXTURES, REPO, golden
from tests.oip_client import array, drive, tensor
from tests.oip_client import python as oip_python
from tests.servers import RunningServer, model_repository, start_server, stop_server, test_settings

ELNINO = np.load(FIXTURES / "elnino_reference.npz")  # inputs (T,), outputs (T,): degrees C
MACRO = np.load(FIXTURES / "macro_reference.npz")  # inputs (T, 4), outputs (T, 2): percentage points
SERVED = ("ModelInfer", "ModelStreamInfer", "ModelMetadata", "ModelReady", "ServerLive", "ServerReady")
WIRE_MESSAGES = [
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerReadyRequest",
    "ServerReadyResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ServerMetadataRequest",
    "ServerMetadataResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "InferParameter",
    "InferTensorContents",
    "ModelInferRequest",
    "ModelInferResponse",
    "ModelStreamInferResponse",
]


def _describe(d: Any) -> dict[str, Any]:
    """The same description of a message's wire format as tests/oip_client/driver.py makes of tritonclient's."""
    return {
        "fields": sorted(
            [f.name, f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else ""]
            for f in d.fields
        ),
        "oneofs": sorted([o.name, sorted(f.name for f in o.fields)] for o in d.oneofs),
        "nested": {n.name: _describe(n) for n in d.nested_types},
    }


def _infer(model: str, x: np.ndarray[Any, Any], **fields: Any) -> dict[str, Any]:
    return {"op": "infer", "model": model, "input": tensor(x), **fields}


def _lstm_v1_steps(client: Client, model: str, xs: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The outputs of one lstm.v1 session stepped one x at a time."""
    with client.create_session(model) as session:
        return np.stack([session.step(x) for x in xs])


def test_the_wire_format_is_the_one_tritonclient_speaks(server: RunningServer) -> None:
    [theirs] = drive(server.target, [{"op": "descriptors", "messages": WIRE_MESSAGES}])
    for name in WIRE_MESSAGES:
        ours = _describe(pb.DESCRIPTOR.message_types_by_name[name])
        assert ours == theirs["messages"][name], name
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        assert theirs["methods"][method.name] == [
            method.input_type.full_name,
            method.output_type.full_name,
            method.client_streaming,
            method.server_streaming,
        ]
    assert set(SERVED) <= {m.name for m in service.methods}


def test_server_and_model_readiness_and_metadata(server: RunningServer) -> None:
    server_info, *ready, macro, elnino, unknown = drive(
        server.target,
        [
            {"op": "server"},
            {"op": "ready", "model": "macro"},
            {"op": "ready", "model": "macro", "version": "1"},
            {"op": "ready", "model": "macro", "version": "2"},
            {"op": "ready", "model": "broken"},  # in the repository, failed to load
            {"op": "ready", "model": "nope"},
            {"op": "metadata", "model": "macro"},
            {"op": "metadata", "model": "elnino"},
            {"op": "metadata", "model": "nope"},
        ],
    )
    assert server_info == {
        "live": True,
        "ready": True,
        "metadata": {"name": "lstm-serve", "version": "0.1.0", "extensions": ["sequence"]},
    }
    assert ready == [True, True, False, False, False]
    assert macro == {
        "name": "macro",
        "versions": ["1"],
        "platform": "lstm-serve_onnx",
        "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": ["1", "-1", "4"]}],
        "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": ["1", "-1", "2"]}],
    }
    assert (elnino["platform"], elnino["inputs"][0]["shape"]) == ("lstm-serve_numpy", ["1", "-1", "1"])
    assert unknown["error"]["status"] == "StatusCode.NOT_FOUND"
    assert "unknown model 'nope'; served models: elnino" in unknown["error"]["message"]


def test_sync_sequence_matches_lstm_v1_exactly_and_pytorch(server: RunningServer, client: Client) -> None:
    xs = ELNINO["inputs"].reshape(-1, 1)
    last = len(xs) - 1
    ops = [
        _infer("elnino", x.reshape(1, 1), sequence_id=4242, start=i == 0, end=i == last, id=f"r{i}")
        for i, x in enumerate(xs)
    ]
    results = drive(server.target, ops)
    got = np.concatenate([array(r) for r in results])  # each [1, 1]
    assert [r["shape"] for r in results] == [[1, 1]] * len(xs)
    assert [r["id"] for r in results] == [f"r{i}" for i in range(len(xs))]
    assert [r["output_names"] for r in results] == [["OUTPUT"]] * len(xs)
    assert [r["parameters"]["lstm_seq"] for r in results] == [{"int64Param": str(i + 1)} for i in range(len(xs))]
    np.testing.assert_array_equal(got, _lstm_v1_steps(client, "elnino", xs))
    np.testing.assert_allclose(got[:, 0], ELNINO["outputs"], atol=1e-4, rtol=0)


def test_time_steps_in_one_request_string_sequence_ids_and_the_end(server: RunningServer, client: Client) -> None:
    g = golden("golden_l3_head")
    xs = g.inputs[0]  # (T, 4)
    start, middle, rest = xs[:1], xs[1:9], xs[9:]
    first, block, tail, after_end = drive(
        server.target,
        [
            _infer("golden_l3_head", start.reshape(1, 1, 4), sequence_id="device-7:a", start=True),
            _infer("golden_l3_head", middle.reshape(1, -1, 4), sequence_id="device-7:a"),
            _infer("golden_l3_head", rest.reshape(1, -1, 4), sequence_id="device-7:a", end=True),
            _infer("golden_l3_head", rest[:1].reshape(1, 4), sequence_id="device-7:a"),
        ],
    )
    assert (first["shape"], block["shape"], tail["shape"]) == ([1, 1, 2], [1, 8, 2], [1, len(rest), 2])
    got = np.concatenate([array(first)[0], array(block)[0], array(tail)[0]])
    np.testing.assert_array_equal(got, _lstm_v1_steps(client, "golden_l3_head", xs))
    np.testing.assert_array_equal(got, client.predict("golden_l3_head", xs).outputs)
    # The sequence ended with the end flag: a request without start is refused as Triton refuses it
    assert after_end["error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert after_end["error"]["message"].startswith(
        "inference request for sequence device-7:a to model 'golden_l3_head' must specify the START flag on the "
        "first request of the sequence (session 'oip:golden_l3_head:device-7:a' was closed by the client"
    )


def test_streamed_sequences_match_lstm_v1_and_pytorch(server: RunningServer, client: Client) -> None:
    """Two sequences interleaved on one stream, one with a bad request in the middle: each sequence's replies keep
    its order, the bad request gets its error in-band, and the stream goes on."""
    xs = MACRO["inputs"]  # (T, 4)
    requests: list[dict[str, Any]] = []
    for i, x in enumerate(xs):
        for sequence in (11, 12):
            requests.append(
                {
                    "input": tensor(x.reshape(1, 4)),
                    "sequence_id": sequence,
                    "start": i == 0,
                    "end": i == len(xs) - 1,
                    "id": f"{sequence}/{i}",
                    "final_flag": sequence == 12,
                }
            )
        if i == 3:
            requests.append({"input": tensor(x.reshape(1, 2, 2)), "sequence_id": 11, "id": "bad"})
    [replies] = drive(server.target, [{"op": "stream", "model": "macro", "requests": requests}])
    errors = [r for r in replies if "error" in r]
    assert len(errors) == 1
    assert errors[0]["error"]["message"] == (
        "input 'INPUT' has shape [1, 2, 2]; model 'macro' takes 'INPUT' (FP32, shape [1, 4] or [1, T, 4])"
    )
    answered = [r for r in replies if "error" not in r]
    expected = _lstm_v1_steps(client, "macro", xs)
    for sequence in (11, 12):
        mine = [r for r in answered if r["id"].startswith(f"{sequence}/")]
        assert [r["id"] for r in mine] == [f"{sequence}/{i}" for i in range(len(xs))]  # in order
        got = np.concatenate([array(r) for r in mine])
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_allclose(got, MACRO["outputs"], atol=1e-4, rtol=0)
        final = [r["parameters"].get("triton_final_response") for r in mine]
        assert final == ([{"boolParam": True}] * len(xs) if sequence == 12 else [None] * len(xs))


def test_stateless_infer_is_predict(server: RunningServer, client: Client) -> None:
    g = golden("golden_l2_wide")
    xs = g.inputs[1]  # (T, I)
    whole, one = drive(
        server.target,
        [
            _infer("golden_l2_wide", xs.reshape(1, *xs.shape), outputs=["OUTPUT"]),
            _infer("golden_l2_wide", xs[:1]),
        ],
    )
    expected = client.predict("golden_l2_wide", xs).outputs
    assert (whole["shape"], one["shape"]) == ([1, *expected.shape], [1, expected.shape[1]])
    np.testing.assert_array_equal(array(whole)[0], expected)
    np.testing.assert_array_equal(array(one), expected[:1])
    assert "lstm_seq" not in whole["parameters"]


def test_lstm_seq_makes_a_resend_exactly_once_and_plain_resends_apply_again(
    server: RunningServer, client: Client
) -> None:
    xs = ELNINO["inputs"][:6].reshape(-1, 1, 1)
    expected = _lstm_v1_steps(client, "elnino", xs.reshape(-1, 1))
    r = drive(
        server.target,
        [
            _infer("elnino", xs[0], sequence_id=31, start=True, parameters={"lstm_seq": 1}),
            _infer("elnino", xs[0], sequence_id=31, start=True, parameters={"lstm_seq": 1}),  # resent start
            _infer("elnino", xs[1], sequence_id=31, parameters={"lstm_seq": 2}),
            _infer("elnino", xs[1], sequence_id=31, parameters={"lstm_seq": 2}),  # resent: replayed
            _infer("elnino", xs[2], sequence_id=31, parameters={"lstm_seq": 2}),  # same seq, other inputs
            _infer("elnino", xs[2], sequence_id=31, parameters={"lstm_seq": 5}),  # a gap
            _infer("elnino", xs[2], sequence_id=31),  # no lstm_seq: the next step (3)
            _infer("elnino", xs[3], sequence_id=31),  # 4
            _infer("elnino", xs[3], sequence_id=31),  # resent without lstm_seq: applied again, as 5
        ],
    )
    for i, want in ((0, 0), (1, 0), (2, 1), (3, 1), (6, 2), (7, 3)):
        np.testing.assert_array_equal(array(r[i])[0], expected[want])
    assert [r[i]["parameters"]["lstm_seq"]["int64Param"] for i in (0, 1, 2, 3, 6, 7, 8)] == list("1122345")
    assert r[4]["error"]["status"] == "StatusCode.FAILED_PRECONDITION"
    assert "seq 2 was already applied with different inputs" in r[4]["error"]["message"]
    assert r[5]["error"]["status"] == "StatusCode.FAILED_PRECONDITION"
    assert "the next step must carry seq 3" in r[5]["error"]["message"]
    assert not np.array_equal(array(r[8]), array(r[7]))  # x3 applied twice: another state, another output
    info = client.session_info("oip:elnino:31")  # the sequence is an lstm.v1 session too
    assert (info.model, info.seq, info.steps) == ("elnino", 5, 5)


@pytest.mark.parametrize("model", ["elnino", "macro"])
def test_restarting_a_sequence_resets_it(server: RunningServer, client: Client, model: str) -> None:
    ref = ELNINO if model == "elnino" else MACRO
    xs = ref["inputs"][:4].reshape(4, 1, -1)
    ops = [_infer(model, x, sequence_id=77, start=i == 0) for i, x in enumerate(xs)]
    results = drive(server.target, ops + ops)  # the second start resets the sequence: the same outputs again
    first = np.concatenate([array(r) for r in results[:4]])
    second = np.concatenate([array(r) for r in results[4:]])
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, _lstm_v1_steps(client, model, xs.reshape(4, -1)))
    client.session(f"oip:{model}:77").close()


def test_tritonclient_sends_the_bearer_token_as_a_header(tmp_path: Path) -> None:
    token = "carol-oip-token-5b7e"
    (tmp_path / "tokens").write_text(f"carol:{token_hash(token)}\n")
    server, handle = start_server(test_settings(model_repository(tmp_path / "models"), tokens_file=tmp_path / "tokens"))
    try:
        x = ELNINO["inputs"][:1].reshape(1, 1)
        headers = {"authorization": f"Bearer {token}"}
        anonymous, carol, ready = drive(
            server.target,
            [
                _infer("elnino", x, sequence_id=1, start=True),
                _infer("elnino", x, sequence_id=1, start=True, headers=headers),
                {"op": "ready", "model": "elnino", "headers": headers},
            ],
        )
    finally:
        stop_server(server, handle)
    assert anonymous["error"]["status"] == "StatusCode.UNAUTHENTICATED"
    assert "requires a bearer token" in anonymous["error"]["message"]
    np.testing.assert_allclose(array(carol)[0], ELNINO["outputs"][:1], atol=1e-4, rtol=0)
    assert ready is True


def test_the_docs_example_runs_as_printed(server: RunningServer, client: Client) -> None:
    text = (REPO / "docs" / "oip.md").read_text()
    [example] = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert "127.0.0.1:50051" in example
    done = subprocess.run(
        [str(oip_python()), "-c", example.replace("127.0.0.1:50051", server.target)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    months = np.array([26.1, 26.4, 26.9, 27.3], dtype=np.float32).reshape(4, 1)
    expected = [round(float(y[0]), 2) for y in _lstm_v1_steps(client, "elnino", months)]
    assert done.stdout.strip() == f"next month's SST forecasts (C): {expected}"
