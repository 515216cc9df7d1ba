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

What the server says beyond the status code is read from the standard google.rpc.Status details
(`grpc-status-details-bin`, decoded by grpcio-status): google.rpc.ErrorInfo's reason and metadata, RetryInfo's delay.
A server before 0.2 sends only the `lstm-error-bin` trailer, which is read when the standard details are absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from lstm_client._proto.lstm.v1 import lstm_pb2

ERROR_METADATA_KEY = "lstm-error-bin"  # deprecated since 0.2: the lstm.v1.Error of a failed call, for older clients
ERROR_DOMAIN = "lstm-serve"  # google.rpc.ErrorInfo.domain of the errors lstm-serve reports


class LstmError(Exception):
    """Base of every error raised by lstm_client."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        expected_seq: int | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.expected_seq = expected_seq
        self.metadata: Mapping[str, str] = metadata or {}  # ErrorInfo.metadata: session_id, model, expected_seq...
        self.retry_after = retry_after  # seconds the server asks to wait before a retry (RetryInfo), when it says


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
_GONE_REASONS = frozenset({"closed", "expired", "evicted", "model_changed", "model_retired"})
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def _error_class(code: grpc.StatusCode, reason: str) -> type[LstmError]:
    """The one choice of a class, from the status code and the reason (ErrorInfo's, or the old detail's)."""
    cls = _BY_CODE.get(code, ServerError)
    if cls is SequenceError and reason in _PRECONDITION_REASONS:
        return StateMismatch
    if cls is NotFound and reason in _GONE_REASONS:
        return SessionGone
    return cls


def error_from_status(code: grpc.StatusCode, message: str, detail: lstm_pb2.Error | None = None) -> LstmError:
    reason = detail.reason if detail is not None else ""
    expected = detail.expected_seq if detail is not None and detail.expected_seq else None
    return _error_class(code, reason)(message, code=code, reason=reason, expected_seq=expected)


def error_from_detail(detail: lstm_pb2.Error) -> LstmError:
    """For in-band errors of StreamSteps."""
    code = _CODE_BY_NUMBER.get(detail.code, grpc.StatusCode.UNKNOWN)
    return error_from_status(code, detail.message, detail)


def error_from_rpc(exc: grpc.RpcError) -> LstmError:
    """Works for sync `grpc.RpcError` (a `grpc.Call`) and for `grpc.aio.AioRpcError` alike."""
    code: grpc.StatusCode = exc.code()
    message: str = exc.details() or code.name
    standard = _standard_status(exc)
    if standard is not None:
        err = error_from_standard(code, message, standard)
    else:
        detail = None
        metadata: Any = exc.trailing_metadata() or ()
        for key, value in metadata:
            if key == ERROR_METADATA_KEY and isinstance(value, bytes):
                detail = lstm_pb2.Error.FromString(value)
        err = error_from_status(code, message, detail)
    err.__cause__ = exc
    return err


def error_from_standard(code: grpc.StatusCode, message: str, status: status_pb2.Status) -> LstmError:
    """From a google.rpc.Status: the ErrorInfo of domain lstm-serve (reason, metadata) and RetryInfo."""
    reason, metadata, retry_after = "", {}, None
    for any_detail in status.details:
        if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                reason, metadata = info.reason, dict(info.metadata)
        elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            any_detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    expected = metadata.get("expected_seq", "")
    return _error_class(code, reason)(
        message,
        code=code,
        reason=reason,
        expected_seq=int(expected) if expected.isdigit() and int(expected) else None,
        metadata=metadata,
        retry_after=retry_after,
    )


def _standard_status(exc: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status of a failed call, or None (an older server; a proxy's own status; unreadable details)."""
    try:
        status: status_pb2.Status | None = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except (ValueError, DecodeError):  # details that contradict the status, or are not a Status at all
        return None
    return status
