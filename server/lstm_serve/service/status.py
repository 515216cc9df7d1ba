"""THE table from domain errors to gRPC status codes, and the details sent with a failed status.

A failed call carries a google.rpc.Status in the standard `grpc-status-details-bin` trailer, so that any gRPC client
(grpcio-status, Go's status.FromError, grpcurl, buf curl...) reads why without knowing lstm.v1: an ErrorInfo always
(reason, domain "lstm-serve", metadata), plus BadRequest / ResourceInfo / RetryInfo where they fit. The details of
releases before 0.2 travel too, for one more release (deprecated): the lstm.v1.Error packed into the Status, and the
same Error in the `lstm-error-bin` trailer. A StreamSteps request that fails answers in-band with lstm.v1.Error
(error_detail), the stream going on.

Everything a client sent that is echoed here is cut to MAX_ECHO_CHARS: the trailers of a status hold 8 KiB in all.
"""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from lstm_client._proto.lstm.v1 import lstm_pb2
from lstm_client.errors import ERROR_DOMAIN, ERROR_METADATA_KEY
from lstm_serve.errors import (
    CapacityExceeded,
    InvalidInput,
    LimitExceeded,
    LstmServeError,
    ModelLoadError,
    ModelNotFound,
    PermissionDenied,
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
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ModelLoadError: grpc.StatusCode.INTERNAL,
    StateMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    Unsupported: grpc.StatusCode.FAILED_PRECONDITION,
}

INTERNAL_MESSAGE = "internal error; the server log has the details"
MAX_ECHO_CHARS = 128  # a session id or model name the client sent, as repeated in the details
SESSION_RESOURCE = "lstm.v1.Session"  # ResourceInfo.resource_type: the proto type a client reads the resource as
MODEL_RESOURCE = "lstm.v1.ModelInfo"


def status_code(exc: LstmServeError) -> grpc.StatusCode:
    return STATUS_CODES.get(type(exc), grpc.StatusCode.INTERNAL)


def error_detail(code: grpc.StatusCode, message: str, exc: LstmServeError | None = None) -> lstm_pb2.Error:
    """The lstm.v1.Error of a failure: in-band in a StreamSteps reply, and (deprecated) beside a failed status."""
    detail = lstm_pb2.Error(code=code.value[0], message=message, reason=exc.reason if exc else "internal")
    if isinstance(exc, SequenceMismatch):
        detail.expected_seq = exc.expected_seq
    return detail


def error_status(code: grpc.StatusCode, exc: LstmServeError | None, request: object = None) -> status_pb2.Status:
    """The google.rpc.Status of a failed call. `exc` None: an internal error (reason "internal"). `request`: the
    parsed request, when there is one, whose session id and model name the details name."""
    message = exc.message if exc is not None else INTERNAL_MESSAGE
    legacy = error_detail(code, message, exc)
    session_id, model = _echo(request, "session_id"), _echo(request, "model") or _echo(request, "name")
    metadata = {"session_id": session_id, "model": model}
    if isinstance(exc, SequenceMismatch):
        metadata["expected_seq"] = str(exc.expected_seq)
        metadata["seq"] = str(getattr(request, "seq", "")) if request is not None else ""
    if exc is not None and exc.retry_after is not None:
        metadata["retry_after_seconds"] = f"{exc.retry_after:.3f}"
    info = error_details_pb2.ErrorInfo(
        reason=legacy.reason, domain=ERROR_DOMAIN, metadata={k: v for k, v in metadata.items() if v}
    )
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(info)
    if isinstance(exc, InvalidInput):
        violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=message)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    elif isinstance(exc, SessionNotFound | SessionExists) and session_id:
        status.details.add().Pack(
            error_details_pb2.ResourceInfo(resource_type=SESSION_RESOURCE, resource_name=session_id)
        )
    elif isinstance(exc, ModelNotFound) and model:
        status.details.add().Pack(error_details_pb2.ResourceInfo(resource_type=MODEL_RESOURCE, resource_name=model))
    if exc is not None and exc.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(exc.retry_after * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status.details.add().Pack(legacy)  # deprecated: for clients before 0.2, removed in the release after 0.2
    return status


def error_metadata(
    code: grpc.StatusCode, exc: LstmServeError | None, request: object = None
) -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata of a failed call: the standard details, and (deprecated) `lstm-error-bin`."""
    status = error_status(code, exc, request)
    standard = tuple(rpc_status.to_status(status).trailing_metadata)
    legacy = error_detail(code, status.message, exc).SerializeToString()
    return (*standard, (ERROR_METADATA_KEY, legacy))


def _echo(request: object, field: str) -> str:
    value = getattr(request, field, "") if request is not None else ""
    if not isinstance(value, str):
        return ""
    return value if len(value) <= MAX_ECHO_CHARS else value[: MAX_ECHO_CHARS - 1] + "…"
