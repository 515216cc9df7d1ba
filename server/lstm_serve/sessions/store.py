"""A session record and the contract every session store keeps.

The contract is async and batch-shaped so that a store across the network (Redis) costs one round trip per batch of
steps, not one per session; the in-memory store answers the same calls without suspending.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

import numpy as np

from lstm_serve.engine.cell import F32
from lstm_serve.errors import CapacityExceeded, InvalidInput, SessionNotFound

MAX_SESSION_ID_CHARS = 128
_CLIENT_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_SESSION_ID_CHARS}}}")
# How a store keys a session: the client's id, prefixed with its tenant's name and "/" when the server authenticates
# (lstm_serve.service.auth). "/" is in no client id, so no client can name another tenant's key.
_TENANT = r"[A-Za-z0-9._-]{1,64}"
TENANT_NAME = re.compile(_TENANT)
_KEY = re.compile(rf"(?:{_TENANT}/)?[A-Za-z0-9._:-]{{1,{MAX_SESSION_ID_CHARS}}}")
DIGEST_BYTES = 16  # blake2b-128 of a step's inputs: a retry with other inputs cannot be made to collide cheaply


class EndReason(StrEnum):
    CLOSED = "closed"
    EXPIRED = "expired"
    EVICTED = "evicted"
    MODEL_CHANGED = "model_changed"  # the model now has another state shape than the session was stepped with
    MODEL_RETIRED = "model_retired"  # the model version it is pinned to stopped being served (lstm_serve.lifecycle)


class CapacityPolicy(StrEnum):
    EVICT = "evict"  # creating a session past max_sessions ends the least recently used one
    REFUSE = "refuse"  # ... or is refused with RESOURCE_EXHAUSTED, and no client loses state it did not give up


EndHook = Callable[[str, EndReason], None]  # (model, reason), called once per ended session, store-wide


@dataclass(frozen=True, slots=True)
class Session:
    """All a session is: its recurrent state, where it is in its sequence, and the last reply (for retries).

    State and reply live in one immutable `bytes` record: the float32 state (2, L, H), then, once the session has
    stepped, the blake2b-128 digest of step `seq`'s inputs and that step's float32 outputs. `rev` names the revision of
    the record and changes with every step and reset (a counter in memory, a random token in Redis): a commit is a
    compare-and-set on it, so a step computed from an old record can never overwrite a newer one, in one process or
    across replicas. Frozen: a store hands out snapshots, and a change
    is a new Session (`stepped`, `reset`).
    """

    id: str
    model: str
    record: bytes
    created: float
    last_used: float
    idle_ttl: float  # seconds; 0 = no idle expiry
    seq: int = 0
    steps: int = 0
    rev: int = 0
    version: int = 1  # the model version the session is pinned to (created on; records from before versions: 1)

    def state_array(self, shape: tuple[int, int, int]) -> F32:
        """A read-only view of the state, shape (2, L, H)."""
        return np.frombuffer(self.record, dtype=np.float32, count=shape[0] * shape[1] * shape[2]).reshape(shape)

    def fits(self, shape: tuple[int, int, int], output_size: int) -> bool:
        """Whether the record was written by a model of this state shape (a changed model leaves records that do not
        fit, and must not be read as if they did)."""
        n = 4 * shape[0] * shape[1] * shape[2]
        rest = len(self.record) - n
        return rest == 0 or (rest > DIGEST_BYTES and (rest - DIGEST_BYTES) % (4 * output_size) == 0)

    def stepped(self, seq: int, state: F32, outputs: F32, digest: bytes, now: float) -> Session:
        """The session after step `seq` (built directly: this is on every step's path, and `replace` costs more)."""
        steps = self.steps + (len(outputs) if outputs.ndim == 2 else 1)
        record = state.tobytes() + digest + outputs.tobytes()
        return Session(
            self.id, self.model, record, self.created, now, self.idle_ttl, seq, steps, self.rev + 1, self.version
        )

    def reset(self, zero_state: bytes, now: float) -> Session:
        """Zero state; the stored reply stays (a retry of step `seq` still gets its answer)."""
        return replace(self, record=zero_state + self.record[len(zero_state) :], rev=self.rev + 1, last_used=now)

    def last_reply(self, shape: tuple[int, int, int], output_size: int) -> tuple[bytes, F32] | None:
        """The digest of step `seq`'s inputs and its outputs as (T, O), or None before the first step. (Whether the
        request had shape [I] or [1, I] is the retry's own: same inputs, same digest.)"""
        n = 4 * shape[0] * shape[1] * shape[2]
        if len(self.record) == n:
            return None
        digest = self.record[n : n + DIGEST_BYTES]
        outputs = np.frombuffer(self.record, dtype=np.float32, offset=n + DIGEST_BYTES).reshape(-1, output_size)
        return digest, outputs


def input_digest(xs: F32) -> bytes:
    return hashlib.blake2b(xs.tobytes(), digest_size=DIGEST_BYTES).digest()


@dataclass(frozen=True, slots=True)
class StepWrite:
    """A step to commit: `base` is the session as the step was computed from it; `after` is the result. The store
    applies it only if the session is still at `base.rev`."""

    base: Session
    after: Session


@dataclass(frozen=True, slots=True)
class Stale:
    """A commit lost the compare-and-set: `current` is the session as the store has it now (another replica or a
    reset got there first); the caller decides again from it, e.g. replays the stored reply."""

    current: Session


CommitResult = Session | Stale | SessionNotFound | CapacityExceeded
LoadResult = Session | SessionNotFound


def new_session_id() -> str:
    """128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


def validate_session_id(session_id: str) -> str:
    """A session id as clients write it (the strict form: no tenant prefix)."""
    if not _CLIENT_ID.fullmatch(session_id):  # fullmatch: "$" would admit a trailing newline
        raise InvalidInput("session_id must be 1-128 characters of [A-Za-z0-9._:-]", "session_id")
    return session_id


def validate_session_key(key: str) -> str:
    """A store's key of a session: a client id, optionally prefixed with "tenant/" (see session_key)."""
    if not _KEY.fullmatch(key):
        raise InvalidInput("session_id must be 1-128 characters of [A-Za-z0-9._:-]", "session_id")
    return key


def session_key(tenant: str, session_id: str) -> str:
    """Where a tenant's session `session_id` lives in the store; the id is checked in its strict client form, so
    that no client can reach a key of another tenant. The anonymous tenant "" (a server without tokens) keys
    sessions by their plain ids."""
    validate_session_id(session_id)
    return f"{tenant}/{session_id}" if tenant else session_id


def tenant_of(key: str) -> str:
    """The tenant part of a session key ("" for a plain id)."""
    tenant, slash, _ = key.partition("/")
    return tenant if slash else ""


def client_id(key: str) -> str:
    """The id the client knows a session key by: every message a client reads names this, never the key."""
    return key.rpartition("/")[2]


class SessionStore(Protocol):
    """Where sessions live. Every method may raise StoreUnavailable (a shared store that cannot be reached).

    `shared` tells whether other processes see the same sessions (several workers or replicas may only serve one port
    or one set of clients with a shared store); `authoritative` whether `load(..., fresh=False)` always answers the
    truth (a store with a process-local cache answers from the cache, and a commit then validates it).
    """

    shared: bool
    authoritative: bool
    # The capacity a client is told about (GetServerInfo): live sessions at most, what happens at that number, and
    # the idle TTL of a session created without one (seconds; 0 = none).
    max_sessions: int
    policy: CapacityPolicy
    default_ttl: float

    async def create(
        self,
        model: str,
        zero_state: bytes,
        session_id: str | None,
        idle_ttl: float | None,
        *,
        tenant_limit: int = 0,
        version: int = 1,
    ) -> Session:
        """A new session of `model`, pinned to its `version`. Raises SessionExists when a live session has
        `session_id` (a key: see session_key); CapacityExceeded
        under the refuse policy, or when `tenant_limit` > 0 and the key's tenant (tenant_of) holds that many live
        sessions already, store-wide."""
        ...

    async def load(self, session_ids: Sequence[str], *, fresh: bool) -> list[LoadResult]:
        """The sessions, in order; SessionNotFound (naming why a session ended) for those that are gone. With
        fresh=False a store may answer from its cache."""
        ...

    def now(self) -> float:
        """The time to stamp a write's last use with: the store's own clock (Redis replaces it with Redis's)."""
        ...

    async def commit(self, writes: Sequence[StepWrite]) -> list[CommitResult]:
        """Applies each write whose base is still current (compare-and-set on rev), restarting its idle clock; a write
        that would pass the store's byte budget under the refuse policy is answered CapacityExceeded."""
        ...

    async def reset(self, session_id: str, zero_state: bytes) -> Session: ...

    async def close(self, session_id: str) -> Session: ...

    async def end(self, session_id: str, reason: EndReason, detail: str, *, model: str = "") -> None:
        """Ends a live session for a reason of the server's (a model that changed shape); no-op if already gone, or
        if `model` is given and the session under the id now is of another model (re-created meanwhile)."""
        ...

    async def pinned(self, model: str, version: int) -> int | None:
        """Live sessions pinned to this model version, or None when the store cannot tell cheaply (Redis)."""
        ...

    async def end_version(self, model: str, version: int, reason: EndReason, detail: str) -> int:
        """Ends the live sessions pinned to a model version that stops being served; returns how many (a store that
        cannot find them cheaply ends none here: the data plane ends each one when it is next used)."""
        ...

    async def sweep(self) -> int:
        """Ends idle sessions past their TTL (a shared store: those nobody has accounted for yet); returns how many."""
        ...

    async def counts(self) -> dict[str, int]:
        """Live sessions by model, store-wide."""
        ...

    async def size_bytes(self) -> int:
        """Memory the sessions take: their records (memory store), or Redis's used memory."""
        ...

    async def ping(self) -> None:
        """Raises StoreUnavailable when the store cannot serve."""
        ...

    async def aclose(self) -> None: ...
