"""What every RPC of the transport shares, in one place: admission (limits per peer and overall, the drain at
shutdown), parsing the request bytes, timing, metrics, logging, and mapping domain errors to a status.

The caller's tenant (TENANT, set by the authentication interceptor in service/auth.py; "" on a server without tokens)
is read here too: each tenant has a request budget (--tenant-rate), and the servicer hands the tenant to the data
plane, which keeps every tenant's sessions apart.

Requests arrive as raw bytes and are parsed here, so that a malformed message is the client's error
(INVALID_ARGUMENT, counted and logged like any refusal) instead of grpc's UNKNOWN with a traceback. The health service
is outside this gate: no number of calls or streams here can starve it, so an orchestrator never restarts a server
(and loses its in-memory sessions) because clients kept it busy.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message

from lstm_serve.errors import InvalidInput, LimitExceeded, LstmServeError, RateLimited, ShuttingDown
from lstm_serve.logs import RateLimitedLog
from lstm_serve.metrics import GrpcSeries, Metrics, StreamSeries
from lstm_serve.service.status import INTERNAL_MESSAGE, error_metadata, status_code
from lstm_serve.token_bucket import TokenBucket

log = logging.getLogger("lstm_serve.service")

CANCEL_SETTLE = 0.05  # seconds a stream's end waits for a cancellation in flight, when someone acts on how it ended
Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]
REQUEST_ID_KEY = "x-request-id"
ADMISSION_RETRY = 0.1  # seconds a call refused for the calls in progress is told to wait (RetryInfo)

# The authenticated tenant of the call being handled: set by service/auth.py's interceptor in the call's own task
# (grpc.aio runs the interceptors and the handler of one call in one task, so it holds for the whole call and for the
# tasks the call starts); "" when the server does not authenticate.
TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("lstm_serve_tenant", default="")


@dataclass(frozen=True, slots=True)
class CallLimits:
    max_calls: int = 1024  # unary calls in progress plus open streams, over all clients
    max_calls_per_peer: int = 256  # the same, per client address (behind a proxy: per proxy)
    stream_idle_timeout: float = 300.0  # a stream that sends nothing for this long is ended (0 = never)
    tenant_rate: float = 0.0  # requests per second per tenant (unary calls and stream requests); 0 = no limit
    tenant_burst: int = 0  # requests at once above the rate; 0 = one second's worth
    max_message_bytes: int = 4 << 20  # the largest message received or sent (a grpc server option; told to clients)


class TenantRates:
    """A token bucket per tenant, in this process: `rate` requests a second on average, `burst` at once. Tenants
    come from the tokens file (or are the one anonymous tenant), so the buckets are few."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst) if burst > 0 else max(1.0, rate)
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, tenant: str) -> None:
        """Takes one request's token, or raises RateLimited saying when one will be there."""
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = TokenBucket(self.rate, self.burst, self._clock)
        wait = bucket.take()
        if wait:
            raise RateLimited(
                f"your tenant sent more than its {self.rate:g} requests/s (burst {self.burst:g}); "
                f"retry in {wait:.3f} s",
                retry_after=wait,
            )


def request_id(context: Context) -> str | None:
    """The caller's request id from the call metadata, for correlating our logs with theirs."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return str(value)[:128]
    return None


def peer_host(context: Context) -> str:
    """ "ipv4:10.0.0.7:53211" -> "ipv4:10.0.0.7": limits count per client address, not per connection."""
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


def parse(message_type: type[Req], data: bytes) -> Req:
    try:
        return message_type.FromString(data)
    except DecodeError:
        raise InvalidInput(f"malformed {message_type.DESCRIPTOR.name} message ({len(data)} bytes)") from None


class Calls:
    def __init__(self, metrics: Metrics, limits: CallLimits = CallLimits()) -> None:
        self.metrics = metrics
        self.limits = limits
        self.draining = False
        self._in_flight = 0
        self._per_peer: Counter[str] = Counter()
        self._streams: dict[asyncio.Task[Any], float] = {}  # each stream's reader -> when it last received
        self._idle = asyncio.Event()  # set when nothing is in flight
        self._idle.set()
        self._refusals = RateLimitedLog(log, per_second=20.0, burst=100)
        self._rates = TenantRates(limits.tenant_rate, limits.tenant_burst) if limits.tenant_rate > 0 else None
        metrics.watch_calls(lambda: self._in_flight, lambda: len(self._streams), lambda: float(self.draining))

    # --- admission ----------------------------------------------------------------------------------------------

    def enter(self, peer: str, *, request: bool = True) -> None:
        """Admits a call or raises: UNAVAILABLE while draining (the client retries elsewhere), RESOURCE_EXHAUSTED
        over a limit. `request`: the call is a request of its own (a unary call; a stream pays for each of its
        requests with `charge` instead)."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry (another replica, or this one once restarted)")
        if self._in_flight >= self.limits.max_calls:
            raise LimitExceeded(
                f"the server has {self._in_flight} calls in progress, its limit; retry later",
                retry_after=ADMISSION_RETRY,
            )
        if self._per_peer[peer] >= self.limits.max_calls_per_peer:
            raise LimitExceeded(
                f"{self._per_peer[peer]} calls in progress from your address, its limit; close idle streams",
                retry_after=ADMISSION_RETRY,
            )
        if request:  # charged last: a call refused for the limits above costs the tenant nothing
            self.charge()
        self._in_flight += 1
        self._per_peer[peer] += 1
        self._idle.clear()

    @property
    def tenant_burst(self) -> int:
        """Requests a tenant may send at once above its rate, as enforced (0 without a rate)."""
        return int(self._rates.burst) if self._rates is not None else 0

    def charge(self) -> None:
        """One request of the call's tenant against its rate (--tenant-rate); raises RateLimited over it."""
        if self._rates is not None:
            self._rates.take(TENANT.get())

    def leave(self, peer: str) -> None:
        self._in_flight -= 1
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]
        if self._in_flight == 0:
            self._idle.set()

    def watch_stream(self, reader: asyncio.Task[Any]) -> None:
        self._streams[reader] = time.monotonic()
        reader.add_done_callback(self._streams.pop)

    def stream_received(self, reader: asyncio.Task[Any]) -> None:
        self._streams[reader] = time.monotonic()

    def end_idle_streams(self) -> int:
        """Stops reading streams idle past the limit (they then end with UNAVAILABLE: reconnect when needed)."""
        if self.limits.stream_idle_timeout <= 0:
            return 0
        oldest = time.monotonic() - self.limits.stream_idle_timeout
        idle = [reader for reader, seen in self._streams.items() if seen < oldest]
        for reader in idle:
            reader.cancel()
        return len(idle)

    async def drain(self, grace: float) -> bool:
        """Refuses new calls, stops every stream reading (each answers what it has, then ends with UNAVAILABLE), and
        waits up to `grace` seconds for the calls in progress; returns whether they all finished."""
        self.draining = True
        for reader in list(self._streams):
            reader.cancel()
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            return False
        return True

    # --- one call -----------------------------------------------------------------------------------------------

    def unary(
        self,
        method: str,
        message_type: type[Req],
        handler: Callable[[Req, Context], Awaitable[Resp]],
        *,
        service: str = "",
    ) -> Callable[[bytes, Context], Awaitable[Resp]]:
        """The grpc behaviour of a unary method: raw bytes in, the handler's reply out. `service`: the full service
        name, for the grpc_server_* series."""
        series = self.metrics.grpc_series(service, method, "unary")

        async def behaviour(data: bytes, context: Context) -> Resp:
            start = time.perf_counter()
            series.started.inc()
            series.received.inc()
            code = grpc.StatusCode.OK
            counted: float | None = None
            request: Req | None = None
            peer = peer_host(context)
            try:
                self.enter(peer)
                try:
                    request = parse(message_type, data)
                    reply = await handler(request, context)
                    series.sent.inc()
                    return reply
                finally:
                    self.leave(peer)
            except LstmServeError as exc:
                code = status_code(exc)
                context.set_trailing_metadata(error_metadata(code, exc, request))
                self.refused(method, request, request_id(context), code, exc.message)
                counted = self.finished(method, code, start, series)  # before the client sees the status (and scrapes)
                await context.abort(code, exc.message)
                raise  # abort() raises; this line only satisfies the type checker
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                self.failed(method, request, context)
                counted = self.finished(method, code, start, series)
                context.set_trailing_metadata(error_metadata(code, None, request))
                await context.abort(code, INTERNAL_MESSAGE)
                raise
            finally:
                if counted is None:
                    self.finished(method, code, start, series)

        return behaviour

    async def stream(
        self,
        method: str,
        requests: AsyncIterator[bytes],
        context: Context,
        take: Callable[[bytes, StreamReplies[Resp]], None],
        window: int,
        *,
        on_end: Callable[[grpc.StatusCode], None] | None = None,
        service: str = "",
    ) -> AsyncIterator[Resp]:
        """The grpc behaviour of a stream of independent requests, each answered in-band. `take(data, replies)`
        starts a request's work and returns at once; the work answers with `replies.answer(reply, code, arrived)`,
        exactly once, from a future's callback (no task per request) or from `replies.spawn`. Requests are taken as
        they arrive, at most `window` unanswered, and answered as they finish; what must stay in order (one
        session's steps) is ordered by the data plane. The stream is admitted like a call; each request pays its
        tenant's rate in `take`.

        A stream that stops being read (the server drains for shutdown, or the stream sat idle past the limit) first
        answers every request it took, then ends with UNAVAILABLE: the client reconnects and resends what was not
        answered. `on_end` is told how the stream ended (OK: the client ended it, having had every answer).

        Each request is timed from its arrival (`replies.arrived` while `take` runs: keep it for the answer) to
        `replies.answer`, which counts its code (lstm_stream_request_seconds, lstm_stream_requests_total).
        """
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        peer = peer_host(context)
        series = self.metrics.grpc_series(service, method, "bidi_stream")
        series.started.inc()
        try:
            self.enter(peer, request=False)
        except LstmServeError as exc:
            code = status_code(exc)
            self.finished(method, code, start, series)
            context.set_trailing_metadata(error_metadata(code, exc))
            await context.abort(code, exc.message)
        replies: StreamReplies[Resp] = StreamReplies(self.metrics.stream_series(method))
        received, sent = series.received.inc, series.sent.inc

        async def read() -> None:
            async for data in requests:
                arrived = time.perf_counter()
                received()
                self.stream_received(reader)
                if replies.unanswered >= window:
                    replies.room.clear()
                    await replies.room.wait()
                replies.unanswered += 1
                replies.arrived = arrived
                take(data, replies)

        reader = asyncio.create_task(read())
        self.watch_stream(reader)
        reader.add_done_callback(lambda _: replies.ready.set())
        try:
            while True:
                while replies.ready_to_send:
                    replies.unanswered -= 1
                    if replies.unanswered < window:
                        replies.room.set()
                    sent()
                    yield replies.ready_to_send.popleft()
                if reader.done() and replies.unanswered == 0:
                    break
                replies.ready.clear()
                if not replies.ready_to_send:
                    await replies.ready.wait()
            if reader.cancelled():  # drained or idle: everything taken is answered; now send the client elsewhere
                raise ShuttingDown(
                    "the server is shutting down; reconnect and resend unanswered requests"
                    if self.draining
                    else f"stream idle for {self.limits.stream_idle_timeout:g} s; reconnect when needed"
                )
            reader.result()  # re-raises a failure of the request side
            if on_end is not None:
                # The request side ends alike when the client half-closes and when it cancels; a cancel reaches
                # this task a moment later (from gRPC's core, through the loop). Whoever acts on how the stream
                # ended (bound sessions: closed now, or after a grace) waits that moment out.
                await asyncio.sleep(CANCEL_SETTLE)
            if context.cancelled():  # the client cancelled rather than half-closed
                code = grpc.StatusCode.CANCELLED
        except ShuttingDown as exc:
            code = status_code(exc)
            context.set_trailing_metadata(error_metadata(code, exc))
            await context.abort(code, exc.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.RpcError:  # the client went away: nobody to answer
            code = grpc.StatusCode.CANCELLED
        except Exception:
            code = grpc.StatusCode.INTERNAL
            self.failed(method, None, context)
            context.set_trailing_metadata(error_metadata(code, None))
            await context.abort(code, INTERNAL_MESSAGE)
        finally:
            reader.cancel()
            for pending in list(replies.tasks):
                pending.cancel()
            if on_end is not None:
                on_end(code)
            self.leave(peer)
            self.finished(method, code, start, series)

    def finished(self, method: str, code: grpc.StatusCode, start: float, series: GrpcSeries | None = None) -> float:
        """Records a call's end: lstm_rpcs_total and its duration, and with `series` the grpc_server_* ones."""
        elapsed = time.perf_counter() - start
        self.metrics.rpc_finished(method, code.name, elapsed)
        if series is not None:
            series.handled(code.name).inc()
            series.seconds.observe(elapsed)
        if code == grpc.StatusCode.OK and log.isEnabledFor(logging.DEBUG):
            log.debug("%s OK", method, extra={"method": method, "duration_ms": round(elapsed * 1e3, 3)})
        return elapsed

    def refused(self, method: str, request: object, rid: str | None, code: grpc.StatusCode, message: str) -> None:
        """A refused request, at INFO, rate-limited: a client flooding bad requests cannot flood the log."""
        fields = {
            "method": method,
            "code": code.name,
            "session_id": getattr(request, "session_id", None) or None,
            "seq": getattr(request, "seq", None),
            "request_id": rid,
            "tenant": TENANT.get() or None,
        }
        self._refusals.info("%s %s: %s", method, code.name, message, extra=fields)

    def failed(self, method: str, request: object, context: Context) -> None:
        """INTERNAL: a bug; logged with the traceback (the caller only learns that it happened)."""
        fields = {
            "method": method,
            "session_id": getattr(request, "session_id", None),
            "request_id": request_id(context),
        }
        log.exception("%s failed", method, extra=fields)


class StreamReplies(Generic[Resp]):
    """One stream's replies: those ready to send, and how many requests are taken but not answered yet."""

    def __init__(self, series: StreamSeries) -> None:
        self.ready_to_send: deque[Resp] = deque()
        self.ready = asyncio.Event()  # a reply was queued, or the request side ended
        self.room = asyncio.Event()  # the window has room again
        self.unanswered = 0
        self.tasks: set[asyncio.Task[None]] = set()  # requests answered by a task of their own
        self.arrived = 0.0  # time.perf_counter() when the request being taken arrived
        self._series = series

    def answer(self, reply: Resp, code: grpc.StatusCode, arrived: float) -> None:
        """Queues a request's answer; `code` is its in-band outcome, `arrived` the request's `self.arrived`."""
        self.ready_to_send.append(reply)
        self.ready.set()
        self._series.answered(code.name, time.perf_counter() - arrived)

    def spawn(self, work: Awaitable[None]) -> None:
        """Runs `work` (which answers) as a task, cancelled if the stream ends first."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
