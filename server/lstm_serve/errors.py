"""Domain errors: what went wrong, in the service's own words. Nothing here knows about gRPC; the transport maps
these classes to status codes in ONE table (lstm_serve.service.status)."""

from __future__ import annotations

MAX_MESSAGE_CHARS = 1024  # messages travel in gRPC trailers (8 KiB in all): a client-supplied string is cut short


class LstmServeError(Exception):
    """Base of every error the domain raises on purpose. `reason` is the stable word clients can branch on.

    The message is for people and may echo what the client sent (a model name, say): it is cut to
    MAX_MESSAGE_CHARS, so that no request can make its own error too big to be delivered."""

    reason = "internal"
    # Seconds after which a retry may succeed, for the errors a retry can cure (the transport tells the client, as
    # google.rpc.RetryInfo); None: a retry does not help by itself.
    retry_after: float | None = None

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 1] + "…"
        super().__init__(message)
        self.message = message


class InvalidInput(LstmServeError):
    """`field` names the request field at fault ("inputs", "h0", "session_id", ...; "" for the whole message), for
    the client's google.rpc.BadRequest."""

    reason = "bad_input"

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class ModelNotFound(LstmServeError):
    reason = "unknown_model"


class SessionNotFound(LstmServeError):
    """`reason` is why: "unknown_session", or how the session ended: "closed", "expired", "evicted"."""

    def __init__(self, message: str, reason: str = "unknown_session") -> None:
        super().__init__(message)
        self.reason = reason


class SessionExists(LstmServeError):
    reason = "exists"


class SequenceMismatch(LstmServeError):
    """The step's seq is neither the next one nor a retry of the last one (or is a retry with other inputs)."""

    reason = "seq_mismatch"

    def __init__(self, message: str, expected_seq: int, reason: str = "seq_mismatch") -> None:
        super().__init__(message)
        self.expected_seq = expected_seq
        self.reason = reason


class StateMismatch(LstmServeError):
    """An imported session state is of another model (name, weights fingerprint or state shape) than the one this
    server serves under that name."""

    reason = "state_mismatch"


class Unsupported(LstmServeError):
    """The model cannot do what was asked (show its gates: weights not readable from its file)."""

    reason = "unsupported"


class LimitExceeded(LstmServeError):
    reason = "limit"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(LstmServeError):
    reason = "unavailable"
    retry_after = 0.0  # at once, on another replica or on a new connection


class StoreUnavailable(LstmServeError):
    """The shared session store could not be reached or did not answer in time. Nothing was committed that the caller
    was not told about: a retry either applies the step or replays its stored reply."""

    reason = "store_unavailable"
    retry_after = 0.1


class CapacityExceeded(LstmServeError):
    """Creating a session would pass --max-sessions and the policy is to refuse rather than evict, or would pass
    --max-sessions-per-tenant."""

    reason = "capacity"


class Unauthenticated(LstmServeError):
    """The call carries no bearer token, or one the server does not know (--tokens-file)."""

    reason = "unauthenticated"


class PermissionDenied(LstmServeError):
    """An admin call (lstm.v1 ModelAdminService) without an admin token, or on a server where admin calls are off."""

    reason = "permission_denied"


class RateLimited(LstmServeError):
    """The caller's tenant sent more requests than --tenant-rate allows (its bucket is empty); retry later."""

    reason = "rate_limited"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelLoadError(LstmServeError):
    """A model file or its config is unusable; raised at load or convert time, never on the request path.

    `message` is for the operator (the log, the command line) and may name server paths; `public` is the short
    reason clients are shown (ListModels, GetModel), without them. It defaults to the message, for messages that name
    no path."""

    reason = "bad_model"

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self.public = message if public is None else public
