"""THE table from domain errors to gRPC status codes, and the error detail sent beside the status."""

from __future__ import annotations

import grpc

from lstm_client._proto.lstm.v1 import lstm_pb2
from lstm_client.errors import ERROR_METADATA_KEY
from lstm_serve.errors import (
    CapacityExceeded,
    InvalidInput,
    LimitExceeded,
    LstmServeError,
    ModelLoadError,
    ModelNotFound,
    RateLimited,
    SequenceMismatch,
    SessionExists,
    SessionNotFound,
    ShuttingDown,
    StateMismatch,
    StoreUnavailable,
    Unauthenticated,
    Unsupported,
)

STATUS_CODES: dict[type[LstmServeError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    SessionNotFound: grpc.StatusCode.NOT_FOUND,
    SessionExists: grpc.StatusCode.ALREADY_EXISTS,
    SequenceMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    CapacityExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ModelLoadError: grpc.StatusCode.INTERNAL,
    StateMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    Unsupported: grpc.StatusCode.FAILED_PRECONDITION,
}

INTERNAL_MESSAGE = "internal error; the server log has the details"


def status_code(exc: LstmServeError) -> grpc.StatusCode:
    return STATUS_CODES.get(type(exc), grpc.StatusCode.INTERNAL)


def error_detail(code: grpc.StatusCode, message: str, exc: LstmServeError | None = None) -> lstm_pb2.Error:
    detail = lstm_pb2.Error(code=code.value[0], message=message, reason=exc.reason if exc else "internal")
    if isinstance(exc, SequenceMismatch):
        detail.expected_seq = exc.expected_seq
    return detail


def error_metadata(detail: lstm_pb2.Error) -> tuple[tuple[str, bytes], ...]:
    return ((ERROR_METADATA_KEY, detail.SerializeToString()),)
