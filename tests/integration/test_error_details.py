"""Failed calls carry the standard google.rpc.Status details (`grpc-status-details-bin`), read here as any generic gRPC
client reads them: a raw grpc channel and grpcio-status, never the lstm client; and the lstm client reads them too,
falling back to the deprecated `lstm-error-bin` trailer of servers before 0.2."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from lstm_client import Client, ResourceExhausted, SequenceError, Unauthenticated
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client.errors import ERROR_METADATA_KEY, error_from_rpc
from lstm_client.tensor import to_tensor
from lstm_serve.service.auth import token_hash
from tests.servers import RunningServer, model_repository, start_server, stop_server, test_settings

MODEL = "golden_l3_head"  # 4 input features
DOMAIN = "lstm-serve"


@pytest.fixture
def stub(server: RunningServer) -> Iterator[lstm_pb2_grpc.LstmServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]


def _fail(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert isinstance(caught.value, grpc.RpcError)
    return caught.value


def _status(exc: grpc.RpcError) -> status_pb2.Status:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]  # also checks code and message match the call's
    assert status is not None, f"no grpc-status-details-bin on {exc}"
    return status


def _details(status: status_pb2.Status, kind: type[Message]) -> list[Any]:
    found = []
    for detail in status.details:
        assert isinstance(detail, any_pb2.Any)
        if detail.Is(kind.DESCRIPTOR):  # type: ignore[arg-type]
            message = kind()
            detail.Unpack(message)
            found.append(message)
    return found


def _error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    [info] = _details(status, error_details_pb2.ErrorInfo)
    assert info.domain == DOMAIN
    return info


def _open(stub: lstm_pb2_grpc.LstmServiceStub) -> str:
    return str(stub.CreateSession(lstm_pb2.CreateSessionRequest(model=MODEL)).session_id)


def test_sequence_mismatch_names_the_expected_seq(stub: lstm_pb2_grpc.LstmServiceStub) -> None:
    sid = _open(stub)
    request = lstm_pb2.StepRequest(session_id=sid, seq=5, inputs=to_tensor(np.zeros(4, "f4")))
    exc = _fail(lambda: stub.Step(request))
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = _status(exc)
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    info = _error_info(status)
    assert info.reason == "seq_mismatch"
    assert dict(info.metadata) == {"session_id": sid, "expected_seq": "1", "seq": "5"}
    # the deprecated forms, for one more release: lstm.v1.Error inside the Status, and the lstm-error-bin trailer
    [legacy] = _details(status, lstm_pb2.Error)
    assert (legacy.reason, legacy.expected_seq, legacy.message) == ("seq_mismatch", 1, status.message)
    trailer = {item.key: item.value for item in exc.trailing_metadata() or ()}
    assert lstm_pb2.Error.FromString(trailer[ERROR_METADATA_KEY]) == legacy


def test_unknown_and_closed_sessions_name_the_resource(stub: lstm_pb2_grpc.LstmServiceStub) -> None:
    status = _status(_fail(lambda: stub.GetSession(lstm_pb2.GetSessionRequest(session_id="never-was"))))
    assert status.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert _error_info(status).reason == "unknown_session"
    [resource] = _details(status, error_details_pb2.ResourceInfo)
    assert (resource.resource_type, resource.resource_name) == ("lstm.v1.Session", "never-was")

    sid = _open(stub)
    stub.CloseSession(lstm_pb2.CloseSessionRequest(session_id=sid))
    status = _status(_fail(lambda: stub.ResetSession(lstm_pb2.ResetSessionRequest(session_id=sid))))
    info = _error_info(status)
    assert (info.reason, info.metadata["session_id"]) == ("closed", sid)


def test_a_taken_session_id_is_already_exists_with_the_resource(stub: lstm_pb2_grpc.LstmServiceStub) -> None:
    stub.CreateSession(lstm_pb2.CreateSessionRequest(model=MODEL, session_id="taken-1"))
    exc = _fail(lambda: stub.CreateSession(lstm_pb2.CreateSessionRequest(model=MODEL, session_id="taken-1")))
    status = _status(exc)
    assert status.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert _error_info(status).reason == "exists"
    [resource] = _details(status, error_details_pb2.ResourceInfo)
    assert resource.resource_name == "taken-1"


def test_unknown_model_names_it_cut_short(stub: lstm_pb2_grpc.LstmServiceStub) -> None:
    for name in ("nope", "m" * 100_000):
        status = _status(_fail(lambda name=name: stub.GetModel(lstm_pb2.GetModelRequest(name=name))))
        info = _error_info(status)
        assert info.reason == "unknown_model"
        [resource] = _details(status, error_details_pb2.ResourceInfo)
        assert resource.resource_type == "lstm.v1.ModelInfo"
        assert resource.resource_name == name if len(name) < 128 else len(resource.resource_name) == 128
        assert info.metadata["model"] == resource.resource_name


def test_bad_inputs_name_the_field(stub: lstm_pb2_grpc.LstmServiceStub) -> None:
    sid = _open(stub)
    cases = [
        (lambda: stub.Step(lstm_pb2.StepRequest(session_id=sid, seq=1, inputs=to_tensor(np.zeros(3, "f4")))), "inputs"),
        (lambda: stub.Step(lstm_pb2.StepRequest(session_id=sid, seq=1)), "inputs"),
        (lambda: stub.GetSession(lstm_pb2.GetSessionRequest(session_id="has spaces")), "session_id"),
        (
            lambda: stub.Predict(
                lstm_pb2.PredictRequest(model=MODEL, inputs=to_tensor(np.zeros((2, 4), "f4")), h0=to_tensor([1.0]))
            ),
            "h0",
        ),
    ]
    for call, field in cases:
        exc = _fail(call)
        status = _status(exc)
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert _error_info(status).reason == "bad_input"
        [bad] = _details(status, error_details_pb2.BadRequest)
        [violation] = bad.field_violations
        assert (violation.field, violation.description) == (field, exc.details())
    # nothing was applied: the session still expects seq 1
    assert stub.GetSession(lstm_pb2.GetSessionRequest(session_id=sid)).seq == 0


def test_malformed_bytes_get_the_standard_details_too(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/lstm.v1.LstmService/Step", request_serializer=None, response_deserializer=None)
        exc = _fail(lambda: call(b"\xff\xff\xff", timeout=10))
    status = _status(exc)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert _error_info(status).reason == "bad_input"
    [bad] = _details(status, error_details_pb2.BadRequest)
    assert bad.field_violations[0].field == ""  # the whole message


def test_the_client_reads_the_standard_details(client: Client) -> None:
    with client.create_session(MODEL) as session:
        session.step(np.zeros(4))
        session.seq = 7  # as if this client had lost count
        with pytest.raises(SequenceError) as caught:
            session.step(np.zeros(4))
    err = caught.value
    assert (err.reason, err.expected_seq) == ("seq_mismatch", 2)
    # ErrorInfo's metadata exists only in the standard details: the client read them
    assert dict(err.metadata) == {"session_id": session.id, "expected_seq": "2", "seq": "8"}


# --- servers with tokens and a tenant rate: UNAUTHENTICATED from the interceptor, RetryInfo ----------------------


@contextlib.contextmanager
def _serving(tmp_path: Path, **overrides: object) -> Iterator[RunningServer]:
    server, handle = start_server(test_settings(model_repository(tmp_path / "models"), **overrides))
    try:
        yield server
    finally:
        stop_server(server, handle)


def test_interceptor_refusals_and_rate_limits_carry_details(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with _serving(tmp_path, tokens=[f"acme:{token_hash('s3cret')}"], tenant_rate=0.2, tenant_burst=1) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]
            status = _status(_fail(lambda: stub.ListModels(lstm_pb2.ListModelsRequest())))
            assert status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
            assert _error_info(status).reason == "unauthenticated"
            auth = (("authorization", "Bearer s3cret"),)
            stub.ListModels(lstm_pb2.ListModelsRequest(), metadata=auth)  # the burst of 1
            exc = _fail(lambda: stub.ListModels(lstm_pb2.ListModelsRequest(), metadata=auth))
            status = _status(exc)
            assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            info = _error_info(status)
            assert info.reason == "rate_limited"
            [retry] = _details(status, error_details_pb2.RetryInfo)
            delay = retry.retry_delay.ToNanoseconds() / 1e9
            assert 0 < delay <= 5.0  # one request per 5 s
            assert float(info.metadata["retry_after_seconds"]) == pytest.approx(delay, abs=1e-3)
        with Client(server.target, token="s3cret") as client, pytest.raises(ResourceExhausted) as caught:
            client.list_models()  # the bucket is still empty (the client does not retry RESOURCE_EXHAUSTED)
        assert caught.value.reason == "rate_limited"
        assert caught.value.retry_after is not None
        assert 0 < caught.value.retry_after <= 5.0
        with Client(server.target, token="wrong") as client, pytest.raises(Unauthenticated) as refused:
            client.list_models()
        assert refused.value.reason == "unauthenticated"


def test_a_stream_ended_idle_carries_retry_info(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with _serving(tmp_path, stream_idle_timeout=0.3) as server, grpc.insecure_channel(server.target) as channel:
        stub = lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]
        call = stub.StreamSteps(_silent(time.monotonic() + 10), timeout=10)
        exc = _fail(lambda: list(call))
    status = _status(exc)
    assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert _error_info(status).reason == "unavailable"
    [retry] = _details(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() == 0  # at once, on a new stream


def _silent(deadline: float) -> Iterator[lstm_pb2.StepRequest]:
    """A request stream that sends nothing until the deadline (the server ends it idle long before)."""
    while time.monotonic() < deadline:
        time.sleep(0.05)
    yield from ()


# --- an older server: only the lstm-error-bin trailer --------------------------------------------------------------


LEGACY = lstm_pb2.Error(code=9, message="seq 3 is not next", reason="seq_mismatch", expected_seq=2)
CONTRADICTING = status_pb2.Status(code=5, message="seq 3 is not next")  # NOT_FOUND, on a FAILED_PRECONDITION call


@pytest.mark.parametrize(
    "standard",
    [None, b"\xff\xfe not a Status", CONTRADICTING.SerializeToString()],
    ids=["server-before-0.2", "undecodable-details", "contradicting-details"],
)
def test_the_client_falls_back_to_the_old_trailer(standard: bytes | None) -> None:
    """A server before 0.2 sends only lstm-error-bin; a proxy could mangle the standard details. The client then reads
    the old trailer rather than failing or trusting details that contradict the call's own status."""
    trailers = [(ERROR_METADATA_KEY, LEGACY.SerializeToString())]
    if standard is not None:
        trailers.append(("grpc-status-details-bin", standard))

    def step(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort_with_status(_OldStatus(grpc.StatusCode.FAILED_PRECONDITION, LEGACY.message, tuple(trailers)))
        raise AssertionError("abort_with_status raises")

    server = grpc.server(ThreadPoolExecutor(2))
    handler = grpc.method_handlers_generic_handler(
        "lstm.v1.LstmService", {"Step": grpc.unary_unary_rpc_method_handler(step)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/lstm.v1.LstmService/Step", request_serializer=None, response_deserializer=None)
            exc = _fail(lambda: call(b"", timeout=10))
    finally:
        server.stop(0)
    err = error_from_rpc(exc)
    assert isinstance(err, SequenceError)
    assert (err.reason, err.expected_seq, err.message) == ("seq_mismatch", 2, "seq 3 is not next")
    assert err.metadata == {}


class _OldStatus(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, bytes], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata
