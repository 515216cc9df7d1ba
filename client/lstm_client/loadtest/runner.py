"""The load itself: sessions created up front, then driven over unary Step calls or StreamSteps streams.

Every call goes through the client's retry policy (`--retry-budget`): a step whose reply was lost to a failover is
resent with its original seq, a broken stream is reopened and its unanswered requests resent, so a run through a load
balancer survives a replica being killed with no errors; the retries are counted in the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import grpc
import grpc.aio
import numpy as np

from lstm_client import _calls, _retry
from lstm_client._proto.lstm.v1 import lstm_pb2
from lstm_client._retry import RetryPolicy, StreamBroken
from lstm_client.aio import AsyncClient
from lstm_client.errors import LstmError, error_from_detail
from lstm_client.loadtest.report import LoadResult, SessionRecord
from lstm_client.tensor import FloatArray, from_tensor
from lstm_client.tls import TlsConfig


@dataclass(frozen=True)
class LoadConfig:
    target: str
    model: str
    sessions: int = 64
    steps: int = 200  # time steps per session
    steps_per_message: int = 1
    mode: Literal["unary", "stream"] = "stream"
    sessions_per_stream: int = 1
    sessions_per_message: int = 1  # > 1: StepMany calls (unary) or many-session requests (stream) of this many
    concurrency: int = 0  # sessions running at once; 0 = all
    duration: float = 60.0  # seconds; no new message is sent after this
    timeout: float = 10.0  # per unary call
    retry_budget: float = RetryPolicy().budget  # seconds a failing call is retried for; 0 = no retries
    seed: int = 0
    record: bool = False  # keep every input and output (for verification)
    progress: float = 0.0  # seconds between progress lines on stderr; 0 = none
    tls: bool | TlsConfig = False  # see lstm_client.Client
    token: str | None = field(default=None, repr=False)  # bearer token; never printed

    def as_dict(self) -> dict[str, object]:
        values = asdict(self)
        values["tls"] = self.tls is not False
        values["token"] = None if self.token is None else "***"
        return values


INPUT_POOL = 16  # distinct random inputs per session, used in turn; enough to make each session's sequence its own


@dataclass
class _Run:
    """One session's schedule. Inputs come from a small pre-generated pool, so that long runs cost no memory and the
    timed loop does no random-number generation; the request for message i is built when it is sent."""

    session_id: str
    messages: int
    pool: list[FloatArray]
    record: SessionRecord | None
    next: int = 0
    sent_at: float = 0.0

    def pending(self) -> lstm_pb2.StepRequest:
        x = self.pool[self.next % len(self.pool)]
        return _calls.step_request(self.session_id, self.next + 1, x)

    def answered(self, outputs: FloatArray | None) -> None:
        if self.record is not None and outputs is not None:
            self.record.inputs.append(self.pool[self.next % len(self.pool)])
            self.record.outputs.append(outputs)
        self.next += 1

    def done(self) -> bool:
        return self.next >= self.messages


async def run_load(config: LoadConfig) -> LoadResult:
    result = LoadResult()
    retry = RetryPolicy(budget=config.retry_budget)
    client = AsyncClient(config.target, timeout=config.timeout, retry=retry, tls=config.tls, token=config.token)
    async with client:
        client._on_retry = result.retried
        info = await client.get_model(config.model)
        runs = await _create_sessions(client, config, info.input_size)
        result.sessions = [r.record for r in runs if r.record is not None]
        progress = asyncio.create_task(_progress(result, config.progress)) if config.progress > 0 else None
        result.started = time.perf_counter()
        deadline = result.started + config.duration
        try:
            await _drive(client, runs, config, result, deadline)
        finally:
            result.elapsed = time.perf_counter() - result.started
            if progress is not None:
                progress.cancel()
        await _close_sessions(client, runs)
        if config.record:
            await _verify(client, config, result)
    return result


async def _create_sessions(client: AsyncClient, config: LoadConfig, input_size: int) -> list[_Run]:
    """The load generator picks the session ids itself, so that CreateSession can be retried after a lost reply."""
    rng = np.random.default_rng(config.seed)
    per_message = config.steps_per_message
    n_messages = math.ceil(config.steps / per_message)
    shape = (input_size,) if per_message == 1 else (per_message, input_size)
    pools = [[rng.standard_normal(shape, dtype=np.float32) for _ in range(INPUT_POOL)] for _ in range(config.sessions)]
    gate = asyncio.Semaphore(64)
    ttl = max(600.0, 2 * config.duration)
    run_id = secrets.token_hex(4)

    async def create(i: int) -> _Run:
        async with gate:
            session = await client.create_session(config.model, ttl=ttl, session_id=f"lt-{config.seed}-{i}-{run_id}")
        record = SessionRecord(session.id) if config.record else None
        return _Run(session.id, n_messages, pools[i], record)

    return list(await asyncio.gather(*(create(i) for i in range(config.sessions))))


async def _drive(
    client: AsyncClient, runs: list[_Run], config: LoadConfig, result: LoadResult, deadline: float
) -> None:
    concurrency = config.concurrency or len(runs)
    if config.sessions_per_message > 1:
        await _drive_many(client, runs, config, result, deadline)
        return
    if config.mode == "unary":
        gate = asyncio.Semaphore(concurrency)

        async def unary(run: _Run) -> None:
            async with gate:
                await _unary_session(client, run, config, result, deadline)

        await asyncio.gather(*(unary(r) for r in runs))
        return
    group = max(1, config.sessions_per_stream)
    gate = asyncio.Semaphore(max(1, concurrency // group))
    groups = [runs[i : i + group] for i in range(0, len(runs), group)]

    async def stream(members: list[_Run]) -> None:
        async with gate:
            await _stream(client, members, config, result, deadline)

    await asyncio.gather(*(stream(g) for g in groups))


def _fail(run: _Run, result: LoadResult, code: str) -> None:
    result.errors[code] += 1
    if run.record is not None:
        run.record.failed = True


async def _unary_session(
    client: AsyncClient, run: _Run, config: LoadConfig, result: LoadResult, deadline: float
) -> None:
    per_message = config.steps_per_message
    while not run.done() and time.perf_counter() < deadline:
        start = time.perf_counter()
        try:
            reply = await client._invoke("Step", run.pending(), affinity=run.session_id)
        except LstmError as exc:
            _fail(run, result, exc.code.name)
            return
        result.ok(per_message, time.perf_counter() - start)
        run.answered(from_tensor(reply.outputs) if run.record is not None else None)


async def _stream(
    client: AsyncClient, runs: list[_Run], config: LoadConfig, result: LoadResult, deadline: float
) -> None:
    """One stream, its sessions interleaved: each has one request in flight, the next sent when its reply arrives.

    When the stream breaks (or a reply says UNAVAILABLE), a new one is opened after the policy's pause and every
    unanswered request is resent with its original seq. The retry budget starts again with every reply: it bounds one
    outage, not the whole run. A request's latency counts from its first sending, its retries included.
    """
    by_id = {r.session_id: r for r in runs}
    outstanding = dict(by_id)  # session id -> its run, whose pending() request is unanswered
    schedule = client.retry.schedule()

    async def send(call: Any, run: _Run) -> None:
        if not run.sent_at:
            run.sent_at = time.perf_counter()
        await _retry.write(call, run.pending())

    async def attempt() -> None:
        call = client._open_stream(affinity=runs[0].session_id)
        try:
            for run in list(outstanding.values()):
                await send(call, run)
            while outstanding:
                reply = await _retry.read(call, config.timeout)
                if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
                    raise StreamBroken("the server ended the step stream early")
                run = by_id[reply.session_id]
                if outstanding.get(run.session_id) is None or reply.seq != run.next + 1:
                    continue  # not a reply this stream is waiting for
                if reply.WhichOneof("result") == "error":
                    err = error_from_detail(reply.error)
                    if _retry.retryable(err):
                        raise err  # resent, with the other unanswered ones, on a new stream
                    del outstanding[run.session_id]
                    _fail(run, result, err.code.name)
                    continue
                del outstanding[run.session_id]
                schedule.reset()
                now = time.perf_counter()
                result.ok(config.steps_per_message, now - run.sent_at)
                run.sent_at = 0.0
                run.answered(from_tensor(reply.outputs) if run.record is not None else None)
                if not run.done() and now < deadline:
                    outstanding[run.session_id] = run
                    await send(call, run)
            await call.done_writing()
        except BaseException:
            call.cancel()
            raise

    try:
        await _retry.run_async(attempt, schedule, on_retry=client._on_retry)
    except LstmError as exc:
        for run in outstanding.values():
            _fail(run, result, exc.code.name)


async def _drive_many(
    client: AsyncClient, runs: list[_Run], config: LoadConfig, result: LoadResult, deadline: float
) -> None:
    """Many sessions per message: groups of sessions_per_message runs, each group one message in flight at a time;
    unary: one StepMany call per message; stream: a stream carries sessions_per_stream sessions' groups."""
    size = config.sessions_per_message
    groups = [runs[i : i + size] for i in range(0, len(runs), size)]
    concurrency = max(1, (config.concurrency or len(runs)) // size)
    gate = asyncio.Semaphore(concurrency)
    if config.mode == "unary":

        async def unary(group: list[_Run]) -> None:
            async with gate:
                await _unary_many(client, group, config, result, deadline)

        await asyncio.gather(*(unary(g) for g in groups))
        return
    per_stream = max(1, config.sessions_per_stream // size)
    streams = [groups[i : i + per_stream] for i in range(0, len(groups), per_stream)]

    async def stream(members: list[list[_Run]]) -> None:
        async with gate:
            await _stream_many(client, members, config, result, deadline)

    await asyncio.gather(*(stream(m) for m in streams))


def _settle_many(
    group: list[_Run], replies: Sequence[lstm_pb2.StepReply], config: LoadConfig, result: LoadResult, latency: float
) -> list[_Run]:
    """Books the replies to a many-session message; returns the runs that go on."""
    going: list[_Run] = []
    for run, reply in zip(group, replies, strict=True):
        if reply.HasField("error"):
            _fail(run, result, error_from_detail(reply.error).code.name)
            continue
        result.ok(config.steps_per_message, latency)
        run.answered(from_tensor(reply.outputs) if run.record is not None else None)
        if not run.done():
            going.append(run)
    return going


async def _unary_many(
    client: AsyncClient, group: list[_Run], config: LoadConfig, result: LoadResult, deadline: float
) -> None:
    while group and time.perf_counter() < deadline:
        start = time.perf_counter()
        request = lstm_pb2.StepManyRequest(steps=[run.pending() for run in group])
        try:
            response = await client._invoke("StepMany", request)
        except LstmError as exc:
            for run in group:
                _fail(run, result, exc.code.name)
            return
        group = _settle_many(group, response.replies, config, result, time.perf_counter() - start)


async def _stream_many(
    client: AsyncClient, groups: list[list[_Run]], config: LoadConfig, result: LoadResult, deadline: float
) -> None:
    """Like _stream, with one many-session request in flight per group; a reply is matched to its group by the
    first session it answers, and must answer the group's pending seqs."""
    outstanding = {group[0].session_id: group for group in groups}  # first session's id -> the group, unanswered
    sent_at: dict[str, float] = {}
    schedule = client.retry.schedule()

    async def send(call: Any, group: list[_Run]) -> None:
        sent_at.setdefault(group[0].session_id, time.perf_counter())
        await _retry.write(call, lstm_pb2.StepRequest(steps=[run.pending() for run in group]))

    async def attempt() -> None:
        call = client._open_stream(affinity=None)
        try:
            for group in list(outstanding.values()):
                await send(call, group)
            while outstanding:
                reply = await _retry.read(call, config.timeout)
                if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
                    raise StreamBroken("the server ended the step stream early")
                if reply.HasField("error"):  # the whole message refused: every group's fate is the same
                    raise error_from_detail(reply.error)
                if not reply.replies:
                    continue
                first = reply.replies[0]
                answered = outstanding.get(first.session_id)
                if answered is None or first.seq != answered[0].next + 1:
                    continue  # not a reply this stream is waiting for
                errors = [error_from_detail(r.error) for r in reply.replies if r.HasField("error")]
                for err in errors:
                    if _retry.retryable(err):
                        raise err  # resent, with the other unanswered ones, on a new stream
                del outstanding[first.session_id]
                schedule.reset()
                now = time.perf_counter()
                going = _settle_many(answered, reply.replies, config, result, now - sent_at.pop(first.session_id))
                if going and now < deadline:
                    outstanding[going[0].session_id] = going
                    await send(call, going)
            await call.done_writing()
        except BaseException:
            call.cancel()
            raise

    try:
        await _retry.run_async(attempt, schedule, on_retry=client._on_retry)
    except LstmError as exc:
        for group in outstanding.values():
            for run in group:
                _fail(run, result, exc.code.name)


async def _close_sessions(client: AsyncClient, runs: list[_Run]) -> None:
    gate = asyncio.Semaphore(64)

    async def close(run: _Run) -> None:
        async with gate:
            request = lstm_pb2.CloseSessionRequest(session_id=run.session_id)
            with contextlib.suppress(LstmError):  # best effort: the session expires by its TTL anyway
                await client._invoke("CloseSession", request, affinity=run.session_id)

    await asyncio.gather(*(close(r) for r in runs))


async def _verify(client: AsyncClient, config: LoadConfig, result: LoadResult) -> None:
    """Replays each completed session's inputs through the stateless Predict and compares the outputs."""
    for record in result.sessions:
        if record.failed or not record.inputs:
            continue
        xs = np.concatenate([np.atleast_2d(x) for x in record.inputs])
        ys = np.concatenate([np.atleast_2d(y) for y in record.outputs])
        try:
            expected = (await client.predict(config.model, xs)).outputs
        except LstmError:
            result.mismatched += 1
            continue
        if np.allclose(ys, expected, atol=1e-4, rtol=1e-4):
            result.verified += 1
        else:
            result.mismatched += 1


async def _progress(result: LoadResult, every: float) -> None:
    last_steps, last_time = 0, time.perf_counter()
    while True:
        await asyncio.sleep(every)
        now = time.perf_counter()
        rate = (result.steps - last_steps) / (now - last_time)
        errors = sum(result.errors.values())
        print(
            f"[{now - result.started:6.1f}s] {result.steps:>10,} steps  {rate:>9,.0f} steps/s  {errors} errors  "
            f"{result.retries} retries",
            file=sys.stderr,
            flush=True,
        )
        last_steps, last_time = result.steps, now
