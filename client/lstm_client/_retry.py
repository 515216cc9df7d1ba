"""Retries for both clients, their sessions and step streams, and the load generator: one policy, one schedule, and a
blocking and an awaiting driver over it.

Resending is safe because every step carries its seq and the server deduplicates: a step whose reply was lost is
answered from the stored reply, never applied twice. Calls that change nothing (reads, Predict) are safe anyway; the
one call that is not, CreateSession without a client-chosen id, is never passed through here with a schedule.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import grpc

from lstm_client.errors import LstmError, ServerError, error_from_rpc

T = TypeVar("T")

# A lost connection or a missed deadline says nothing about whether the server applied the call; resending settles it.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# gRPC metadata key naming the session a call is about; a load balancer may hash on it to keep a session on one
# replica (a cache hit), but correctness never depends on it.
AFFINITY_KEY = "x-session-id"

OnRetry = Callable[[BaseException], None]


class StreamBroken(Exception):
    """A step stream ended (or could no longer be written) with requests still unanswered: reopen and resend them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When to give up resending a call that failed with UNAVAILABLE, DEADLINE_EXCEEDED or a broken stream.

    budget: seconds from the first attempt after which no new attempt starts. Time rather than a count, because what
        has to be outlasted is a replica restart or a failover (typically 2-3 s), however many fast failures it takes;
        0 disables retries. Each attempt still has the client's own `timeout` as its deadline.
    initial_backoff, multiplier, max_backoff: the pause before retry n is drawn below
        min(max_backoff, initial_backoff * multiplier ** n): quick enough to hide a dropped connection, capped so that
        a recovered server is noticed within about max_backoff.
    jitter: "full" draws each pause uniformly from [0, that bound], "decorrelated" from [initial_backoff, 3 x the
        previous pause] (capped), "none" uses the bound itself. Jitter keeps the clients that one failure hit together
        from all coming back at the same instant.
    attempts: optional cap on the number of attempts, the first included (None: only the budget limits).
    """

    budget: float = 10.0
    initial_backoff: float = 0.05
    multiplier: float = 2.0
    max_backoff: float = 1.0
    jitter: Literal["full", "decorrelated", "none"] = "full"
    attempts: int | None = None

    def __post_init__(self) -> None:
        if self.budget < 0 or self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("budget and backoffs must be >= 0")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("attempts must be >= 1 (or None)")
        if self.jitter not in ("full", "decorrelated", "none"):
            raise ValueError(f"unknown jitter {self.jitter!r}")

    def schedule(
        self, *, rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic
    ) -> RetrySchedule:
        """The pauses of one logical call; create it just before the first attempt. `rng` and `clock` are for tests."""
        return RetrySchedule(self, rng or _RNG, clock)


_RNG = random.Random()


class RetrySchedule:
    """The state of one logical call's retries: how many attempts so far, since when, and the previous pause."""

    __slots__ = ("_clock", "_previous", "_rng", "_start", "attempts", "policy")

    def __init__(self, policy: RetryPolicy, rng: random.Random, clock: Callable[[], float]) -> None:
        self.policy = policy
        self._rng = rng
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """Starts the budget again: for long-lived calls (streams) after they made progress."""
        self._start = self._clock()
        self._previous = self.policy.initial_backoff
        self.attempts = 1

    def next_pause(self) -> float | None:
        """Seconds to wait before the next attempt, or None: give up. Never runs past the budget."""
        p = self.policy
        if p.attempts is not None and self.attempts >= p.attempts:
            return None
        remaining = p.budget - (self._clock() - self._start)
        if remaining <= 0:
            return None
        if p.jitter == "decorrelated":
            pause = min(p.max_backoff, self._rng.uniform(p.initial_backoff, 3 * self._previous))
        else:
            bound = min(p.max_backoff, p.initial_backoff * p.multiplier ** min(self.attempts - 1, 64))
            pause = self._rng.uniform(0.0, bound) if p.jitter == "full" else bound
        self._previous = max(pause, p.initial_backoff)
        self.attempts += 1
        return min(pause, remaining)


# What gRPC says when a proxy (nginx) resets a call whose upstream died mid-call: the status is INTERNAL, but the
# call was cut in transit, not failed by the server, so it is a broken connection like any other.
_TRANSPORT_RESETS = ("RST_STREAM", "Stream removed")


def retryable(exc: BaseException) -> bool:
    if isinstance(exc, StreamBroken):
        return True
    if isinstance(exc, LstmError):  # an in-band error of a step stream
        return exc.code in RETRYABLE_CODES
    if isinstance(exc, grpc.RpcError):
        code = exc.code()
        if code == grpc.StatusCode.INTERNAL:
            return any(mark in (exc.details() or "") for mark in _TRANSPORT_RESETS)
        return code in RETRYABLE_CODES
    return False


def affinity(session_id: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata of a call about `session_id` (None: a call about no session)."""
    # an id that is no valid header value (a newline, say) is not one the server accepts either: let it say so
    if session_id and session_id.isascii() and session_id.isprintable():
        return ((AFFINITY_KEY, session_id),)
    return None


def call_metadata(session_id: str | None, auth: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...] | None:
    """The metadata of every call a client makes: the session it is about (`affinity`) and the client's bearer token
    (`auth`, from lstm_client.tls.auth_metadata)."""
    about = affinity(session_id)
    if not auth:
        return about
    return auth + about if about else auth


async def write(call: Any, request: object) -> None:
    """Writes `request` on a grpc.aio stream call; a write the call can no longer take raises StreamBroken.

    grpc.aio reports a write after the transport dropped as INTERNAL "Internal error from Core", hiding the real
    status (grpc/grpc#36066); a server's own INTERNAL comes with a read, not a write.
    """
    try:
        await call.write(request)
    except asyncio.InvalidStateError:  # the server had already ended the call
        raise StreamBroken("the server ended the step stream early") from None
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.INTERNAL:
            raise
        raise StreamBroken(f"the step stream broke: {exc.details()}") from None


async def read(call: Any, seconds: float) -> Any:
    """The next reply of a grpc.aio stream call, waited for at most `seconds`: a server that stalls, or a connection
    that died without a reset, is a broken stream (reopened and resent), not a wait for ever."""
    try:
        async with asyncio.timeout(seconds):
            return await call.read()
    except TimeoutError:
        call.cancel()
        raise StreamBroken(f"no reply within {seconds:g} s") from None


class ReplyWatchdog:
    """The same bound for the blocking client, whose stream replies cannot be waited for with a timeout: one thread
    per stream (not per step) cancels the call when the reply it waits for is overdue."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.fired = False
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._call: Any = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def arm(self, call: Any) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lstm-stream-watchdog", daemon=True)
                self._thread.start()
            self._deadline, self._call, self.fired = time.monotonic() + self.timeout, call, False
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = self._call = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self.fired, call, self._deadline = True, self._call, None
                call.cancel()


def _pause(exc: BaseException, schedule: RetrySchedule | None, on_retry: OnRetry | None) -> float | None:
    pause = schedule.next_pause() if schedule is not None and retryable(exc) else None
    if pause is not None and on_retry is not None:
        on_retry(exc)
    return pause


def _final(exc: grpc.RpcError | LstmError | StreamBroken) -> LstmError:
    if isinstance(exc, LstmError):
        return exc
    if isinstance(exc, StreamBroken):
        return ServerError(str(exc) or "the step stream broke")
    return error_from_rpc(exc)


def run(attempt: Callable[[], T], schedule: RetrySchedule | None, *, on_retry: OnRetry | None = None) -> T:
    """Calls `attempt` until it succeeds, fails for good, or `schedule` (None: no retries) gives up; blocking pauses.

    gRPC errors and broken streams that end it are raised as the matching LstmError.
    """
    while True:
        try:
            return attempt()
        except (grpc.RpcError, LstmError, StreamBroken) as exc:
            pause = _pause(exc, schedule, on_retry)
            if pause is None:
                raise _final(exc) from None
        time.sleep(pause)


async def run_async(
    attempt: Callable[[], Awaitable[T]], schedule: RetrySchedule | None, *, on_retry: OnRetry | None = None
) -> T:
    """`run` for asyncio: the same schedule, awaited pauses."""
    while True:
        try:
            return await attempt()
        except (grpc.RpcError, LstmError, StreamBroken) as exc:
            pause = _pause(exc, schedule, on_retry)
            if pause is None:
                raise _final(exc) from None
        await asyncio.sleep(pause)
