"""Every kind of bad request gets its status code and a clear message, and changes nothing.

Each case drives a session part-way through a golden sequence, sends the bad request, and then shows that the next
valid step still gives PyTorch's output for that point of the sequence: no state corrupted, no step lost or doubled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_client import Client
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client.errors import ERROR_METADATA_KEY
from lstm_client.tensor import from_tensor, to_tensor
from tests.golden import TOLERANCE, golden
from tests.servers import RunningServer

MODEL = "golden_l3_head"
G = golden(MODEL)
X = G.inputs[0]  # (11, 4)


@pytest.fixture
def stub(server: RunningServer) -> lstm_pb2_grpc.LstmServiceStub:
    channel = grpc.insecure_channel(server.target)
    return lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture
def expected(client: Client) -> np.ndarray:
    return client.predict(MODEL, X).outputs


def _step(stub: lstm_pb2_grpc.LstmServiceStub, sid: str, seq: int, x: object) -> lstm_pb2.StepResponse:
    tensor = x if isinstance(x, lstm_pb2.Tensor) else to_tensor(x)  # type: ignore[arg-type]
    response: lstm_pb2.StepResponse = stub.Step(lstm_pb2.StepRequest(session_id=sid, seq=seq, inputs=tensor))
    return response


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    message: str
    detail: lstm_pb2.Error | None  # the lstm-error-bin trailer


def _failure(call: Callable[[], object]) -> Failure:
    try:
        call()
    except grpc.RpcError as exc:
        metadata: Any = exc.trailing_metadata() or ()
        detail = next((lstm_pb2.Error.FromString(v) for k, v in metadata if k == ERROR_METADATA_KEY), None)
        return Failure(exc.code(), exc.details() or "", detail)
    raise AssertionError("the call succeeded")


def _open(stub: lstm_pb2_grpc.LstmServiceStub, steps: int) -> str:
    """A session that has applied X[:steps] one request each (so its seq == steps)."""
    sid: str = stub.CreateSession(lstm_pb2.CreateSessionRequest(model=MODEL)).session_id
    for t in range(steps):
        _step(stub, sid, t + 1, X[t])
    return sid


def _assert_untouched(stub: lstm_pb2_grpc.LstmServiceStub, sid: str, steps: int, expected: np.ndarray) -> None:
    info = stub.GetSession(lstm_pb2.GetSessionRequest(session_id=sid))
    assert (info.seq, info.steps) == (steps, steps)
    y = from_tensor(_step(stub, sid, steps + 1, X[steps]).outputs)
    np.testing.assert_allclose(y, expected[steps], atol=TOLERANCE, rtol=0)


def _raw(shape: list[int], data: bytes) -> lstm_pb2.Tensor:
    return lstm_pb2.Tensor(shape=shape, data=data)


BAD_STEPS: list[tuple[str, Callable[[], object], grpc.StatusCode, str]] = [
    ("wrong feature count", lambda: np.ones(3), grpc.StatusCode.INVALID_ARGUMENT, "takes 4 input features, got 3"),
    ("wrong rank", lambda: np.ones((2, 2, 4)), grpc.StatusCode.INVALID_ARGUMENT, "inputs must have shape [4] or"),
    ("NaN", lambda: np.array([0, np.nan, 0, 0]), grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf (first at step 0"),
    ("Inf in a block", lambda: np.r_[X[:2], [[0, 0, np.inf, 0]]], grpc.StatusCode.INVALID_ARGUMENT, "at step 2"),
    ("empty tensor", lambda: lstm_pb2.Tensor(), grpc.StatusCode.INVALID_ARGUMENT, "inputs is missing"),
    ("zero steps", lambda: np.zeros((0, 4)), grpc.StatusCode.INVALID_ARGUMENT, "no time step"),
    ("bytes/shape mismatch", lambda: _raw([4], b"\0" * 12), grpc.StatusCode.INVALID_ARGUMENT, "needs 16 bytes"),
    ("too many steps", lambda: np.zeros((513, 4)), grpc.StatusCode.RESOURCE_EXHAUSTED, "the limit is 512"),
    ("oversized message", lambda: np.zeros((20_000, 4)), grpc.StatusCode.RESOURCE_EXHAUSTED, "message larger"),
    ("rank 65", lambda: _raw([1] * 65, b"\0" * 4), grpc.StatusCode.INVALID_ARGUMENT, "at most 8 dimensions"),
]


@pytest.mark.parametrize(("what", "make", "code", "message"), BAD_STEPS, ids=[c[0] for c in BAD_STEPS])
def test_bad_step_is_refused_and_changes_nothing(
    stub: lstm_pb2_grpc.LstmServiceStub,
    expected: np.ndarray,
    what: str,
    make: Callable[[], object],
    code: grpc.StatusCode,
    message: str,
) -> None:
    sid = _open(stub, 3)
    failure = _failure(lambda: _step(stub, sid, 4, make()))
    assert failure.code == code, failure.message
    assert message in failure.message
    _assert_untouched(stub, sid, 3, expected)


def test_out_of_order_seq_names_the_expected_one(stub: lstm_pb2_grpc.LstmServiceStub, expected: np.ndarray) -> None:
    sid = _open(stub, 3)
    for seq in (0, 2, 5, 10**12):
        failure = _failure(lambda seq=seq: _step(stub, sid, seq, X[3]))  # type: ignore[misc]
        assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "the next step must carry seq 4" in failure.message
        assert failure.detail is not None
        assert (failure.detail.reason, failure.detail.expected_seq) == ("seq_mismatch", 4)
    _assert_untouched(stub, sid, 3, expected)


def test_retry_returns_the_stored_reply_and_applies_nothing(
    stub: lstm_pb2_grpc.LstmServiceStub, expected: np.ndarray
) -> None:
    sid = _open(stub, 2)
    first = from_tensor(_step(stub, sid, 3, X[2]).outputs)
    again = from_tensor(_step(stub, sid, 3, X[2]).outputs)  # the client never saw the first answer and resends
    np.testing.assert_array_equal(first, again)
    _assert_untouched(stub, sid, 3, expected)  # (this applies X[3] as seq 4)
    block = from_tensor(_step(stub, sid, 5, X[4:7]).outputs)
    assert block.shape == (3, 2)
    np.testing.assert_array_equal(from_tensor(_step(stub, sid, 5, X[4:7]).outputs), block)
    np.testing.assert_allclose(block, expected[4:7], atol=TOLERANCE, rtol=0)


def test_retry_with_different_inputs_is_refused(stub: lstm_pb2_grpc.LstmServiceStub, expected: np.ndarray) -> None:
    sid = _open(stub, 3)
    failure = _failure(lambda: _step(stub, sid, 3, X[5]))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "already applied with different inputs" in failure.message
    assert failure.detail is not None
    assert failure.detail.reason == "retry_mismatch"
    _assert_untouched(stub, sid, 3, expected)


def test_unknown_and_closed_sessions(stub: lstm_pb2_grpc.LstmServiceStub) -> None:
    failure = _failure(lambda: _step(stub, "never-existed", 1, X[0]))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.detail is not None
    assert failure.detail.reason == "unknown_session"
    sid = _open(stub, 1)
    stub.CloseSession(lstm_pb2.CloseSessionRequest(session_id=sid))
    for call in (
        lambda: _step(stub, sid, 2, X[1]),
        lambda: stub.GetSession(lstm_pb2.GetSessionRequest(session_id=sid)),
        lambda: stub.ResetSession(lstm_pb2.ResetSessionRequest(session_id=sid)),
        lambda: stub.CloseSession(lstm_pb2.CloseSessionRequest(session_id=sid)),
    ):
        failure = _failure(call)
        assert failure.code == grpc.StatusCode.NOT_FOUND
        assert "was closed by the client" in failure.message
        assert failure.detail is not None
        assert failure.detail.reason == "closed"


def test_malformed_session_ids_are_bad_input_and_not_echoed(stub: lstm_pb2_grpc.LstmServiceStub) -> None:
    huge = "x" * 100_000
    for call in (
        lambda: _step(stub, huge, 1, X[0]),
        lambda: stub.GetSession(lstm_pb2.GetSessionRequest(session_id="has spaces")),
        lambda: stub.CloseSession(lstm_pb2.CloseSessionRequest(session_id=huge)),
    ):
        failure = _failure(call)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "session_id must be 1-128 characters" in failure.message
        assert len(failure.message) < 200


def test_expired_session_says_so(stub: lstm_pb2_grpc.LstmServiceStub) -> None:
    request = lstm_pb2.CreateSessionRequest(model=MODEL)
    request.idle_ttl.FromMilliseconds(200)
    sid = stub.CreateSession(request).session_id
    _step(stub, sid, 1, X[0])
    time.sleep(0.5)  # the server sweeps every 0.1 s in these tests
    failure = _failure(lambda: _step(stub, sid, 2, X[1]))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert "expired after 0.2 s idle" in failure.message


def test_unknown_model_and_bad_predict_inputs(stub: lstm_pb2_grpc.LstmServiceStub) -> None:
    cases = [
        (lstm_pb2.PredictRequest(model="nope", inputs=to_tensor(X)), grpc.StatusCode.NOT_FOUND, "unknown model"),
        (lstm_pb2.PredictRequest(model=MODEL, inputs=to_tensor(X[0])), grpc.StatusCode.INVALID_ARGUMENT, "[T, 4]"),
        (
            lstm_pb2.PredictRequest(model=MODEL, inputs=to_tensor(X), h0=to_tensor(np.zeros((3, 7)))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "h0 must have shape [3, 8], got [3, 7]",
        ),
        (
            lstm_pb2.PredictRequest(model=MODEL, inputs=to_tensor(X), c0=to_tensor(np.full((3, 8), np.nan))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "c0 contains NaN or Inf",
        ),
    ]
    for request, code, message in cases:
        failure = _failure(lambda request=request: stub.Predict(request))  # type: ignore[misc]
        assert failure.code == code
        assert message in failure.message
    failure = _failure(lambda: stub.CreateSession(lstm_pb2.CreateSessionRequest(model="nope")))
    assert failure.code == grpc.StatusCode.NOT_FOUND
