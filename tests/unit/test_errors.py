"""Domain errors -> status codes (server, one table) -> exception tree (client): the round trip."""

from __future__ import annotations

import grpc
import pytest

from lstm_client import errors as client_errors
from lstm_client._proto.lstm.v1 import lstm_pb2
from lstm_serve import errors
from lstm_serve.service.status import STATUS_CODES, error_detail, error_metadata, status_code


def _all_subclasses(cls: type[errors.LstmServeError]) -> set[type[errors.LstmServeError]]:
    found: set[type[errors.LstmServeError]] = set()
    for direct in cls.__subclasses__():
        found |= {direct, *_all_subclasses(direct)}
    return found


def test_every_domain_error_has_a_status_code() -> None:
    assert _all_subclasses(errors.LstmServeError) <= set(STATUS_CODES)


@pytest.mark.parametrize(
    ("exc", "client_type"),
    [
        (errors.InvalidInput("x"), client_errors.InvalidArgument),
        (errors.ModelNotFound("x"), client_errors.NotFound),
        (errors.SessionNotFound("x"), client_errors.NotFound),
        (errors.SessionNotFound("x", "expired"), client_errors.SessionGone),
        (errors.SessionNotFound("x", "evicted"), client_errors.SessionGone),
        (errors.SessionExists("x"), client_errors.AlreadyExists),
        (errors.SequenceMismatch("x", expected_seq=7), client_errors.SequenceError),
        (errors.LimitExceeded("x"), client_errors.ResourceExhausted),
        (errors.ShuttingDown("x"), client_errors.Unavailable),
        (errors.Unauthenticated("x"), client_errors.Unauthenticated),
        (errors.RateLimited("x"), client_errors.ResourceExhausted),
        (errors.CapacityExceeded("x"), client_errors.ResourceExhausted),
        (errors.ModelLoadError("x"), client_errors.ServerError),
    ],
)
def test_round_trip(exc: errors.LstmServeError, client_type: type[client_errors.LstmError]) -> None:
    code = status_code(exc)
    detail = lstm_pb2.Error.FromString(error_detail(code, exc.message, exc).SerializeToString())
    for err in (client_errors.error_from_status(code, exc.message, detail), client_errors.error_from_detail(detail)):
        assert type(err) is client_type
        assert isinstance(err, client_errors.LstmError)
        assert (err.code, err.reason, err.message) == (code, exc.reason, "x")
    if isinstance(exc, errors.SequenceMismatch):
        assert client_errors.error_from_detail(detail).expected_seq == 7


def test_status_without_detail_still_maps() -> None:
    err = client_errors.error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max")
    assert isinstance(err, client_errors.ResourceExhausted)
    assert isinstance(client_errors.error_from_status(grpc.StatusCode.INTERNAL, "boom"), client_errors.ServerError)


def test_the_trailers_of_the_longest_error_stay_far_below_8_kib() -> None:
    """grpc refuses trailers over 8 KiB: the standard details, the deprecated trailer and the message together must
    fit, for the longest message (MAX_MESSAGE_CHARS) and the longest echoed request fields."""
    from lstm_client._proto.lstm.v1 import lstm_pb2 as pb

    request = pb.CreateSessionRequest(model="m" * 100_000, session_id="s" * 100_000)
    exc = errors.ModelNotFound("x" * 5000)  # messages are ASCII but for echoed names (cut to 128 characters)
    assert len(exc.message) == errors.MAX_MESSAGE_CHARS
    trailers = error_metadata(status_code(exc), exc, request)
    size = sum(len(key) + len(value) for key, value in trailers) * 4 / 3  # -bin values travel in base64
    size += len(exc.message.encode())  # grpc-message
    assert size < 7 * 1024, size
