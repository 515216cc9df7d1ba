"""Where sessions live between calls. Only an in-memory store for now; the protocol leaves room for Redis."""

from lstm_serve.sessions.memory import MemorySessionStore
from lstm_serve.sessions.store import EndReason, Session, SessionStore, new_session_id, validate_session_id

__all__ = ["EndReason", "MemorySessionStore", "Session", "SessionStore", "new_session_id", "validate_session_id"]
