"""A session record and the contract every session store keeps."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np

from lstm_serve.engine.cell import F32
from lstm_serve.errors import InvalidInput

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class EndReason(StrEnum):
    CLOSED = "closed"
    EXPIRED = "expired"
    EVICTED = "evicted"


@dataclass(slots=True, eq=False)
class Session:
    """All a session is: its recurrent state, where it is in its sequence, and the last reply (for retries).

    `state` is replaced, never written into, so a step computed from it can be dropped without harm.
    """

    id: str
    model: str
    state: F32  # (2, L, H): h then c of every layer
    created: float
    last_used: float
    idle_ttl: float  # seconds; 0 = no idle expiry
    seq: int = 0
    steps: int = 0
    last_outputs: F32 | None = None
    last_digest: int = 0

    def apply(self, seq: int, state: F32, outputs: F32, digest: int) -> None:
        self.state = state
        self.seq = seq
        self.steps += len(outputs) if outputs.ndim == 2 else 1
        self.last_outputs = outputs
        self.last_digest = digest

    def reset(self) -> None:
        self.state = np.zeros_like(self.state)


def new_session_id() -> str:
    """128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


def validate_session_id(session_id: str) -> str:
    if not _CLIENT_ID.match(session_id):
        raise InvalidInput("session_id must be 1-128 characters of [A-Za-z0-9._:-]")
    return session_id


class SessionStore(Protocol):
    def create(self, model: str, state: F32, session_id: str | None, idle_ttl: float | None) -> Session:
        """Raises SessionExists when a live session has `session_id`."""
        ...

    def get(self, session_id: str) -> Session:
        """Raises SessionNotFound, naming why when the session ended (closed, expired, evicted)."""
        ...

    def touch(self, session: Session) -> None:
        """Marks the session used now (after a step or reset); raises SessionNotFound if it ended meanwhile."""
        ...

    def close(self, session_id: str) -> Session: ...

    def sweep(self) -> int:
        """Ends idle sessions past their TTL; returns how many."""
        ...

    def __len__(self) -> int: ...
