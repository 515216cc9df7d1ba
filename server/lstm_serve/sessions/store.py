"""A session record and the contract every session store keeps."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
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

    The state and the reply are immutable `bytes` of float32: a step computed from the state can be dropped without
    harm (the state is replaced, never written into), sessions that never stepped share their model's zero state,
    and each costs a 33-byte header instead of an ndarray's ~110 (see docs/performance.md, memory per session).
    """

    id: str
    model: str
    state: bytes  # float32 (2, L, H): h then c of every layer
    created: float
    last_used: float
    idle_ttl: float  # seconds; 0 = no idle expiry
    seq: int = 0
    steps: int = 0
    last_reply: bytes | None = None  # float32 outputs of step `seq`
    last_single: bool = True  # the reply's shape: (O,) if True, else (T, O)
    last_digest: int = 0  # CRC-32 of step `seq`'s inputs

    def apply(self, seq: int, state: bytes, outputs: F32, digest: int) -> None:
        self.state = state
        self.seq = seq
        self.steps += len(outputs) if outputs.ndim == 2 else 1
        self.last_reply = outputs.tobytes()
        self.last_single = outputs.ndim == 1
        self.last_digest = digest

    def state_array(self, shape: tuple[int, int, int]) -> F32:
        """A read-only view of the state, shape (2, L, H)."""
        return np.frombuffer(self.state, dtype=np.float32).reshape(shape)

    def last_outputs(self, output_size: int) -> F32 | None:
        if self.last_reply is None:
            return None
        ys = np.frombuffer(self.last_reply, dtype=np.float32)
        return ys if self.last_single else ys.reshape(-1, output_size)


def new_session_id() -> str:
    """128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


def validate_session_id(session_id: str) -> str:
    if not _CLIENT_ID.match(session_id):
        raise InvalidInput("session_id must be 1-128 characters of [A-Za-z0-9._:-]")
    return session_id


class SessionStore(Protocol):
    def create(self, model: str, state: bytes, session_id: str | None, idle_ttl: float | None) -> Session:
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

    def sweep_in_chunks(self, chunk: int = 5000) -> Iterator[int]:
        """The same, a chunk at a time: yields the count ended by each chunk."""
        ...

    def __len__(self) -> int: ...
