"""The Open Inference Protocol endpoint from a plain gRPC client (the messages of proto/inference), for what
tritonclient cannot send: typed contents, malformed tensors and parameters, raw bytes, limits; and its sessions,
metrics, authentication and idle expiry, which are lstm.v1's."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from lstm_client import Client, SessionGone
from lstm_serve._proto.inference import grpc_service_pb2 as pb
from lstm_serve._proto.inference import grpc_service_pb2_grpc as pb_grpc
from lstm_serve.service.auth import token_hash
from tests.golden import FIXTURES, golden
from tests.servers import RunningServer, model_repository, start_server, stop_server, test_settings

ELNINO = np.load(FIXTURES / "elnino_reference.npz")
TOKENS = {"alice": "alice-oip-3c1d", "bob": "bob-oip-88a0"}
Code = grpc.StatusCode


@contextlib.contextmanager
def _stub(target: str) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture
def oip(server: RunningServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with _stub(server.target) as stub:
        yield stub


def _request(model: str, x: Any, *, raw: bool = True, **params: bool | int | str) -> pb.ModelInferRequest:
    a = np.asarray(x, dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT", datatype="FP32", shape=a.shape)
    if raw:
        request.raw_input_contents.append(a.tobytes())
    else:
        tensor.contents.fp32_contents.extend(a.ravel().tolist())
    for name, value in params.items():
        if isinstance(value, bool):
            request.parameters[name].bool_param = value
        elif isinstance(value, int):
            request.parameters[name].int64_param = value
        else:
            request.parameters[name].string_param = value
    return request


def _outputs(response: pb.ModelInferResponse) -> np.ndarray[Any, Any]:
    [output] = response.outputs
    assert (output.name, output.datatype) == ("OUTPUT", "FP32")
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(output.shape))


def _refused(call: Any, request: Any, code: grpc.StatusCode, *pieces: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    assert err.value.code() == code, err.value.details()
    details = err.value.details() or ""
    for piece in pieces:
        assert piece in details
    return details


def test_typed_contents_give_what_raw_bytes_give(oip: pb_grpc.GRPCInferenceServiceStub) -> None:
    xs = golden("golden_l1_nohead").inputs[0][None]  # [1, T, I]
    raw = oip.ModelInfer(_request("golden_l1_nohead", xs), timeout=10)
    typed = oip.ModelInfer(_request("golden_l1_nohead", xs, raw=False), timeout=10)
    np.testing.assert_array_equal(_outputs(raw), _outputs(typed))
    assert _outputs(raw).shape == (1, xs.shape[1], 5)  # no head: the outputs are h of the last layer


def test_bad_tensors_are_refused_with_what_to_send(oip: pb_grpc.GRPCInferenceServiceStub) -> None:
    model, bad = "macro", Code.INVALID_ARGUMENT
    take = "model 'macro' takes 'INPUT' (FP32, shape [1, 4] or [1, T, 4])"
    _refused(oip.ModelInfer, _request(model, np.ones(4)), bad, "input 'INPUT' has shape [4]", take)
    _refused(oip.ModelInfer, _request(model, np.ones((2, 4))), bad, "has shape [2, 4]", take)
    _refused(oip.ModelInfer, _request(model, np.ones((1, 3))), bad, "has shape [1, 3]", take)
    request = _request(model, np.ones((1, 4)))
    request.inputs[0].datatype = "FP64"
    _refused(oip.ModelInfer, request, bad, "input 'INPUT' must be FP32, got 'FP64'")
    request = _request(model, np.ones((1, 4)))
    request.inputs[0].name = "x"
    _refused(oip.ModelInfer, request, bad, "unknown input 'x': model 'macro' takes one tensor, 'INPUT'")
    request = _request(model, np.ones((1, 4)))
    request.inputs.add(name="INPUT2", datatype="FP32", shape=[1, 4])
    _refused(oip.ModelInfer, request, bad, "takes one input tensor", "got 2")
    request = _request(model, np.ones((1, 4)))
    request.raw_input_contents[0] = request.raw_input_contents[0][:-1]
    _refused(oip.ModelInfer, request, bad, "of shape [1, 4] needs 16 bytes of raw FP32 data, got 15")
    request = _request(model, np.ones((1, 4)))
    request.inputs[0].contents.fp32_contents.extend([1.0] * 4)
    _refused(oip.ModelInfer, request, bad, "give the data of input 'INPUT' once")
    request = _request(model, np.ones((1, 4)), raw=False)
    del request.inputs[0].contents.fp32_contents[-1]
    _refused(oip.ModelInfer, request, bad, "needs 4 values in contents.fp32_contents", "got 3")
    request = _request(model, np.ones((1, 4)))
    request.outputs.add(name="probabilities")
    _refused(oip.ModelInfer, request, bad, "unknown output 'probabilities': model 'macro' has one output tensor")
    _refused(oip.ModelInfer, _request(model, [[1.0, np.nan, 0.0, 0.0]]), bad, "inputs contain NaN or Inf")
    _refused(oip.ModelInfer, _request("nope", np.ones((1, 4))), Code.NOT_FOUND, "unknown model 'nope'")
    request = _request(model, np.ones((1, 4)))
    request.model_version = "7"
    _refused(oip.ModelInfer, request, Code.NOT_FOUND, "model 'macro' has no version 7 served; ready versions: [1]")


def test_bad_sequence_parameters_are_refused(oip: pb_grpc.GRPCInferenceServiceStub) -> None:
    x, bad = np.ones((1, 1)), Code.INVALID_ARGUMENT
    need = "need a sequence_id"
    _refused(oip.ModelInfer, _request("elnino", x, sequence_start=True), bad, need)
    _refused(oip.ModelInfer, _request("elnino", x, sequence_id=0, sequence_end=True), bad, need)
    _refused(oip.ModelInfer, _request("elnino", x, lstm_seq=3), bad, need)
    _refused(oip.ModelInfer, _request("elnino", x, sequence_id=True), bad, "unsigned integer or a string")
    _refused(oip.ModelInfer, _request("elnino", x, sequence_id=5, sequence_start=1), bad, "must be a bool")
    _refused(oip.ModelInfer, _request("elnino", x, sequence_id=5, lstm_seq=0), bad, "lstm_seq must be an integer >= 1")
    _refused(
        oip.ModelInfer, _request("elnino", x, sequence_id=5, sequence_start=True, lstm_seq=4), bad, "must be 1 there"
    )
    _refused(oip.ModelInfer, _request("elnino", x, sequence_id="a/b"), bad, "must be 1-117 characters")
    _refused(oip.ModelInfer, _request("elnino", x, sequence_id="a" * 118), bad, "must be 1-117 characters")


def test_uint64_ids_name_the_sequence_tritonclient_names_with_int64(
    oip: pb_grpc.GRPCInferenceServiceStub, client: Client
) -> None:
    """tritonclient sends every id as int64; Triton reads the bits as uint64. uint64 2**64 - 1 and int64 -1 are one
    sequence, and so are the integer 8 and the string "8"."""
    x = ELNINO["inputs"][:3].reshape(3, 1, 1)
    big = _request("elnino", x[0], sequence_start=True)
    big.parameters["sequence_id"].uint64_param = 2**64 - 1
    oip.ModelInfer(big, timeout=10)
    oip.ModelInfer(_request("elnino", x[1], sequence_id=-1, sequence_end=True), timeout=10)
    with pytest.raises(SessionGone, match="closed by the client"):  # the same sequence, ended by the end flag
        client.session_info(f"oip:elnino:{2**64 - 1}")
    oip.ModelInfer(_request("elnino", x[0], sequence_id=8, sequence_start=True), timeout=10)
    reply = oip.ModelInfer(_request("elnino", x[1], sequence_id="8"), timeout=10)
    assert reply.parameters["lstm_seq"].int64_param == 2
    assert client.session_info("oip:elnino:8").seq == 2


def test_concurrent_requests_of_one_sequence_are_each_applied_once(server: RunningServer, client: Client) -> None:
    """Without lstm_seq every request is the sequence's next step, even when several arrive at once with the same
    inputs (they must not be mistaken for resends of one another)."""
    threads_n, each = 8, 5
    with _stub(server.target) as oip:
        oip.ModelInfer(_request("elnino", [[26.0]], sequence_id="busy", sequence_start=True), timeout=10)
        errors: list[BaseException] = []

        def send() -> None:
            try:
                for _ in range(each):
                    oip.ModelInfer(_request("elnino", [[26.0]], sequence_id="busy"), timeout=30)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=send) for _ in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors
    info = client.session_info("oip:elnino:busy")
    total = 1 + threads_n * each
    assert (info.seq, info.steps) == (total, total)
    with _stub(server.target) as oip:
        last = oip.ModelInfer(_request("elnino", [[26.0]], sequence_id="busy", sequence_end=True), timeout=10)
    expected = client.predict("elnino", np.full((total + 1, 1), 26.0, np.float32)).outputs[-1]
    np.testing.assert_allclose(_outputs(last)[0], expected, atol=1e-5, rtol=0)


def test_bad_input_changes_nothing(oip: pb_grpc.GRPCInferenceServiceStub, client: Client) -> None:
    xs = ELNINO["inputs"][:3].reshape(3, 1, 1)
    expected = client.predict("elnino", xs.reshape(3, 1)).outputs
    first = oip.ModelInfer(_request("elnino", xs[0], sequence_id=99, sequence_start=True), timeout=10)
    _refused(oip.ModelInfer, _request("elnino", [[np.inf]], sequence_id=99), Code.INVALID_ARGUMENT, "NaN or Inf")
    _refused(oip.ModelInfer, _request("elnino", np.ones((1, 2)), sequence_id=99), Code.INVALID_ARGUMENT, "shape")
    second = oip.ModelInfer(_request("elnino", xs[1], sequence_id=99), timeout=10)
    third = oip.ModelInfer(_request("elnino", xs[2], sequence_id=99, sequence_end=True), timeout=10)
    got = np.concatenate([_outputs(r) for r in (first, second, third)])
    np.testing.assert_array_equal(got, expected)
    assert third.parameters["lstm_seq"].int64_param == 3


def test_limits_are_lstm_v1s(oip: pb_grpc.GRPCInferenceServiceStub) -> None:
    too_long = np.zeros((1, 513, 1))  # the test server's --max-steps-per-request is 512
    _refused(oip.ModelInfer, _request("elnino", too_long), Code.RESOURCE_EXHAUSTED, "513 time steps", "limit is 512")
    _refused(oip.ModelInfer, _request("elnino", too_long, sequence_id=3, sequence_start=True), Code.RESOURCE_EXHAUSTED)
    huge = np.zeros((1, 70_000, 1))  # 280 KB: past the test server's 256 KiB message limit
    _refused(oip.ModelInfer, _request("elnino", huge), Code.RESOURCE_EXHAUSTED)


def test_malformed_messages_and_unserved_rpcs(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", None, None)
        _refused(infer, b"\xff\xff\xff", Code.INVALID_ARGUMENT, "malformed ModelInferRequest message (3 bytes)")
        config = channel.unary_unary("/inference.GRPCInferenceService/ModelConfig", None, None)
        _refused(config, b"", Code.UNIMPLEMENTED)


def test_stream_answers_errors_in_band(oip: pb_grpc.GRPCInferenceServiceStub) -> None:
    good = _request("elnino", [[25.0]])
    good.id = "ok"
    bad = _request("elnino", [[25.0]], sequence_id="never-started")
    bad.id = "bad"
    replies = list(oip.ModelStreamInfer(iter([bad, good]), timeout=10))
    by_id = {r.infer_response.id: r for r in replies}
    assert by_id["bad"].error_message.startswith(
        "inference request for sequence never-started to model 'elnino' must specify the START flag"
    )
    params = by_id["bad"].infer_response.parameters
    assert (params["lstm_error_code"].string_param, params["lstm_error_reason"].string_param) == (
        "INVALID_ARGUMENT",
        "unknown_session",
    )
    assert by_id["ok"].error_message == ""
    assert _outputs(by_id["ok"].infer_response).shape == (1, 1)


def _scrape(server: RunningServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_oip_calls_like_lstm_v1_calls(server: RunningServer) -> None:
    before = _scrape(server)
    with _stub(server.target) as oip:
        oip.ModelInfer(_request("golden_l2_wide", np.zeros((1, 3, 6)), sequence_id=1, sequence_start=True))
        list(oip.ModelStreamInfer(iter([_request("golden_l2_wide", np.zeros((1, 6)), sequence_id=1)]), timeout=10))
        with contextlib.suppress(grpc.RpcError):
            oip.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=10)
    after = _scrape(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("lstm_rpcs_total", method="ModelInfer", code="OK") == 1
    assert delta("lstm_rpcs_total", method="ModelStreamInfer", code="OK") == 1
    assert delta("lstm_stream_requests_total", method="ModelStreamInfer", code="OK") == 1
    assert delta("lstm_stream_request_seconds_count", method="ModelStreamInfer") == 1
    oip_labels = {"grpc_service": "inference.GRPCInferenceService", "grpc_type": "unary"}
    assert delta("grpc_server_handled_total", grpc_method="ModelInfer", grpc_code="OK", **oip_labels) == 1
    assert delta("grpc_server_handled_total", grpc_method="ModelMetadata", grpc_code="NOT_FOUND", **oip_labels) == 1
    stream_labels = {**oip_labels, "grpc_type": "bidi_stream", "grpc_method": "ModelStreamInfer"}
    assert delta("grpc_server_msg_received_total", **stream_labels) == 1
    assert delta("grpc_server_msg_sent_total", **stream_labels) == 1
    assert delta("grpc_server_handled_total", grpc_code="OK", **stream_labels) == 1
    assert delta("lstm_rpcs_total", method="ModelMetadata", code="NOT_FOUND") == 1
    assert delta("lstm_steps_total", model="golden_l2_wide") == 4
    assert delta("lstm_sessions_created_total", model="golden_l2_wide") == 1


def test_reflection_lists_both_protocols(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        [reply] = list(reflect.ServerReflectionInfo(iter(ask), timeout=10))
    names = {s.name for s in reply.list_services_response.service}
    assert {"lstm.v1.LstmService", "inference.GRPCInferenceService"} <= names


# --- servers of their own -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_repository(tmp_path_factory.mktemp("models"))


@contextlib.contextmanager
def _serving(models: Path, **overrides: object) -> Iterator[RunningServer]:
    server, handle = start_server(test_settings(models, **overrides))
    try:
        yield server
    finally:
        stop_server(server, handle)


def test_tokens_and_tenants_apply_to_oip(models: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{tenant}:{token_hash(token)}\n" for tenant, token in TOKENS.items()))
    x = ELNINO["inputs"][:2].reshape(2, 1, 1)
    with _serving(models, tokens_file=tokens) as server, _stub(server.target) as oip:
        alice = (("authorization", f"Bearer {TOKENS['alice']}"),)
        bob = (("authorization", f"Bearer {TOKENS['bob']}"),)
        _refused(oip.ServerLive, pb.ServerLiveRequest(), Code.UNAUTHENTICATED, "requires a bearer token")
        first = oip.ModelInfer(_request("elnino", x[0], sequence_id=5, sequence_start=True), metadata=alice)
        with pytest.raises(grpc.RpcError) as err:  # alice's sequence 5 is not bob's
            oip.ModelInfer(_request("elnino", x[1], sequence_id=5), metadata=bob, timeout=10)
        assert err.value.code() == Code.INVALID_ARGUMENT
        assert "must specify the START flag" in (err.value.details() or "")
        second = oip.ModelInfer(_request("elnino", x[1], sequence_id=5), metadata=alice, timeout=10)
        assert second.parameters["lstm_seq"].int64_param == 2
        mine = oip.ModelInfer(_request("elnino", x[0], sequence_id=5, sequence_start=True), metadata=bob)
        np.testing.assert_array_equal(_outputs(mine), _outputs(first))


def test_idle_sequences_expire(models: Path) -> None:
    with _serving(models, session_ttl=0.3) as server, _stub(server.target) as oip, server.client() as client:
        oip.ModelInfer(_request("elnino", [[25.0]], sequence_id=1, sequence_start=True), timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the sweeper runs every 0.1 s; reading a session is no use of it
            try:
                client.session_info("oip:elnino:1")
            except SessionGone:
                break
            time.sleep(0.1)
        _refused(
            oip.ModelInfer,
            _request("elnino", [[25.0]], sequence_id=1, lstm_seq=2),
            Code.INVALID_ARGUMENT,
            "must specify the START flag on the first request of the sequence",
            "expired",
        )


def test_oip_can_be_turned_off(models: Path) -> None:
    with _serving(models, oip=False) as server, _stub(server.target) as oip:
        _refused(oip.ServerLive, pb.ServerLiveRequest(), Code.UNIMPLEMENTED)
        with server.client() as client:
            assert client.get_model("elnino").name == "elnino"


def test_idle_streams_end_after_answering(models: Path) -> None:
    with _serving(models, stream_idle_timeout=0.3) as server, _stub(server.target) as oip:
        release = threading.Event()

        def requests() -> Iterator[pb.ModelInferRequest]:
            yield _request("elnino", [[25.0]])
            release.wait(10)  # then nothing more: the stream sits idle

        replies = oip.ModelStreamInfer(requests(), timeout=20)
        try:
            first = next(replies)
            with pytest.raises(grpc.RpcError) as err:
                next(replies)
        finally:
            release.set()
    assert first.error_message == ""
    assert _outputs(first.infer_response).shape == (1, 1)
    assert err.value.code() == Code.UNAVAILABLE
    assert "stream idle for 0.3 s; reconnect when needed" in (err.value.details() or "")
