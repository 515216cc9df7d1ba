"""One exception tree for every failure the client reports, in the spirit of httpx's.

LstmError
├── InvalidArgument        bad input; nothing changed on the server
├── NotFound               unknown model or session
│   └── SessionGone        the session existed and ended: closed, expired, evicted, model_changed (.reason)
├── AlreadyExists          a client-chosen session id is taken
├── SequenceError          the step's seq is not the one the server expects (see .expected_seq)
│   └── StateMismatch      an imported state is of another model; a model cannot show its gates (.reason)
├── ResourceExhausted      a server limit (message size, steps per request, concurrent calls, sessions or
│                          requests per tenant: .reason "capacity" / "rate_limited")
├── Unauthenticated        no bearer token, or one the server does not accept (Client(token=...))
├── Unavailable            server unreachable or shutting down (after the client's own retries)
├── DeadlineExceeded       the call's deadline passed (after the client's own retries)
└── ServerError            anything else the server reports (INTERNAL, UNKNOWN, ...)
"""

from __future__ import annotations

from typing import Any

import grpc

from lstm_client._proto.lstm.v1 import lstm_pb2

ERROR_METADATA_KEY = "lstm-error-bin"


class LstmError(Exception):
    """Base of every error raised by lstm_client."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        expected_seq: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.expected_seq = expected_seq


class InvalidArgument(LstmError):
    pass


class NotFound(LstmError):
    pass


class SessionGone(NotFound):
    pass


class AlreadyExists(LstmError):
    pass


class SequenceError(LstmError):
    pass


class StateMismatch(SequenceError):
    """FAILED_PRECONDITION that is not about seq: an imported session state of another model ("state_mismatch"), or
    a model that cannot do what was asked ("unsupported": gates). A SequenceError, as FAILED_PRECONDITION always was
    to this client."""


class ResourceExhausted(LstmError):
    pass


class Unauthenticated(LstmError):
    pass


class Unavailable(LstmError):
    pass


class DeadlineExceeded(LstmError):
    pass


class ServerError(LstmError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[LstmError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: SequenceError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}
_PRECONDITION_REASONS = frozenset({"state_mismatch", "unsupported"})
_GONE_REASONS = frozenset({"closed", "expired", "evicted", "model_changed"})
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_from_status(code: grpc.StatusCode, message: str, detail: lstm_pb2.Error | None = None) -> LstmError:
    reason = detail.reason if detail is not None else ""
    expected = detail.expected_seq if detail is not None and detail.expected_seq else None
    cls = _BY_CODE.get(code, ServerError)
    if cls is SequenceError and reason in _PRECONDITION_REASONS:
        cls = StateMismatch
    if cls is NotFound and reason in _GONE_REASONS:
        cls = SessionGone
    return cls(message, code=code, reason=reason, expected_seq=expected)


def error_from_detail(detail: lstm_pb2.Error) -> LstmError:
    """For in-band errors of StreamSteps."""
    code = _CODE_BY_NUMBER.get(detail.code, grpc.StatusCode.UNKNOWN)
    return error_from_status(code, detail.message, detail)


def error_from_rpc(exc: grpc.RpcError) -> LstmError:
    """Works for sync `grpc.RpcError` (a `grpc.Call`) and for `grpc.aio.AioRpcError` alike."""
    code: grpc.StatusCode = exc.code()
    message: str = exc.details() or code.name
    detail = None
    metadata: Any = exc.trailing_metadata() or ()
    for key, value in metadata:
        if key == ERROR_METADATA_KEY and isinstance(value, bytes):
            detail = lstm_pb2.Error.FromString(value)
    err = error_from_status(code, message, detail)
    err.__cause__ = exc
    return err
