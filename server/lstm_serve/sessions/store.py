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

    State and reply live in one immutable `bytes` record: the float32 state (2, L, H), then, once the session has
    stepped, the CRC-32 of step `seq`'s inputs (4 bytes, big-endian) and that step's float32 outputs. Immutable, so a
    step computed from the state can be dropped without harm (the record is replaced, never written into); sessions
    that never stepped share their model's zero state; one object instead of arrays and ints saves ~250 bytes a
    session (docs/performance.md, memory per session).
    """

    id: str
    model: str
    record: bytes
    created: float
    last_used: float
    idle_ttl: float  # seconds; 0 = no idle expiry
    seq: int = 0
    steps: int = 0

    def state_array(self, shape: tuple[int, int, int]) -> F32:
        """A read-only view of the state, shape (2, L, H)."""
        return np.frombuffer(self.record, dtype=np.float32, count=shape[0] * shape[1] * shape[2]).reshape(shape)

    def apply(self, seq: int, state: F32, outputs: F32, digest: int) -> None:
        self.record = state.tobytes() + digest.to_bytes(4, "big") + outputs.tobytes()
        self.seq = seq
        self.steps += len(outputs) if outputs.ndim == 2 else 1

    def reset(self, zero_state: bytes) -> None:
        """Zero state; the stored reply stays (a retry of step `seq` still gets its answer)."""
        self.record = zero_state + self.record[len(zero_state) :]

    def last_reply(self, shape: tuple[int, int, int], output_size: int) -> tuple[int, F32] | None:
        """The CRC-32 of step `seq`'s inputs and its outputs as (T, O), or None before the first step. (Whether the
        request had shape [I] or [1, I] is the retry's own: same inputs, same CRC.)"""
        n = 4 * shape[0] * shape[1] * shape[2]
        if len(self.record) == n:
            return None
        digest = int.from_bytes(self.record[n : n + 4], "big")
        return digest, np.frombuffer(self.record, dtype=np.float32, offset=n + 4).reshape(-1, output_size)


def new_session_id() -> str:
    """128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


def validate_session_id(session_id: str) -> str:
    if not _CLIENT_ID.match(session_id):
        raise InvalidInput("session_id must be 1-128 characters of [A-Za-z0-9._:-]")
    return session_id


class SessionStore(Protocol):
    def create(self, model: str, zero_state: bytes, session_id: str | None, idle_ttl: float | None) -> Session:
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
