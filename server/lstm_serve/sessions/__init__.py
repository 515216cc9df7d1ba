"""Where sessions live between calls: in this process (the embedded default) or in Redis, shared by every worker
and replica. Both keep the one contract of lstm_serve.sessions.store."""

from lstm_serve.sessions.memory import MemorySessionStore
from lstm_serve.sessions.store import (
    CapacityPolicy,
    CommitResult,
    EndReason,
    Session,
    SessionStore,
    Stale,
    StepWrite,
    client_id,
    input_digest,
    new_session_id,
    session_key,
    tenant_of,
    validate_session_id,
    validate_session_key,
)

__all__ = [
    "CapacityPolicy",
    "CommitResult",
    "EndReason",
    "MemorySessionStore",
    "Session",
    "SessionStore",
    "Stale",
    "StepWrite",
    "client_id",
    "input_digest",
    "new_session_id",
    "session_key",
    "tenant_of",
    "validate_session_id",
    "validate_session_key",
]
