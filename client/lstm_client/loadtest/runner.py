"""The load itself: sessions created up front, then driven over unary Step calls or StreamSteps streams."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import grpc
import grpc.aio
import numpy as np

from lstm_client import _calls
from lstm_client._proto.lstm.v1 import lstm_pb2
from lstm_client.aio import AsyncClient
from lstm_client.errors import LstmError
from lstm_client.loadtest.report import LoadResult, SessionRecord
from lstm_client.tensor import FloatArray, from_tensor


@dataclass(frozen=True)
class LoadConfig:
    target: str
    model: str
    sessions: int = 64
    steps: int = 200  # time steps per session
    steps_per_message: int = 1
    mode: Literal["unary", "stream"] = "stream"
    sessions_per_stream: int = 1
    concurrency: int = 0  # sessions running at once; 0 = all
    duration: float = 60.0  # seconds; no new message is sent after this
    timeout: float = 10.0  # per unary call
    seed: int = 0
    record: bool = False  # keep every input and output (for verification)
    progress: float = 0.0  # seconds between progress lines on stderr; 0 = none

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


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
    async with AsyncClient(config.target, timeout=config.timeout) as client:
        info = await client.get_model(config.model)
        runs = await _create_sessions(client, config, info.input_size)
        result.sessions = [r.record for r in runs if r.record is not None]
        stub: Any = client._stub
        progress = asyncio.create_task(_progress(result, config.progress)) if config.progress > 0 else None
        result.started = time.perf_counter()
        deadline = result.started + config.duration
        try:
            await _drive(stub, runs, config, result, deadline)
        finally:
            result.elapsed = time.perf_counter() - result.started
            if progress is not None:
                progress.cancel()
        await _close_sessions(client, runs)
        if config.record:
            await _verify(client, config, result)
    return result


async def _create_sessions(client: AsyncClient, config: LoadConfig, input_size: int) -> list[_Run]:
    rng = np.random.default_rng(config.seed)
    per_message = config.steps_per_message
    n_messages = math.ceil(config.steps / per_message)
    gate = asyncio.Semaphore(64)
    ttl = max(600.0, 2 * config.duration)

    async def create(i: int) -> _Run:
        async with gate:
            session = await client.create_session(config.model, ttl=ttl)
        shape = (input_size,) if per_message == 1 else (per_message, input_size)
        pool = [rng.standard_normal(shape, dtype=np.float32) for _ in range(INPUT_POOL)]
        record = SessionRecord(session.id) if config.record else None
        return _Run(session.id, n_messages, pool, record)

    return list(await asyncio.gather(*(create(i) for i in range(config.sessions))))


async def _drive(stub: Any, runs: list[_Run], config: LoadConfig, result: LoadResult, deadline: float) -> None:
    concurrency = config.concurrency or len(runs)
    if config.mode == "unary":
        gate = asyncio.Semaphore(concurrency)

        async def unary(run: _Run) -> None:
            async with gate:
                await _unary_session(stub, run, config, result, deadline)

        await asyncio.gather(*(unary(r) for r in runs))
        return
    group = max(1, config.sessions_per_stream)
    gate = asyncio.Semaphore(max(1, concurrency // group))
    groups = [runs[i : i + group] for i in range(0, len(runs), group)]

    async def stream(members: list[_Run]) -> None:
        async with gate:
            await _stream(stub, members, config, result, deadline)

    await asyncio.gather(*(stream(g) for g in groups))


def _fail(run: _Run, result: LoadResult, code: str) -> None:
    result.errors[code] += 1
    if run.record is not None:
        run.record.failed = True


async def _unary_session(stub: Any, run: _Run, config: LoadConfig, result: LoadResult, deadline: float) -> None:
    per_message = config.steps_per_message
    while not run.done() and time.perf_counter() < deadline:
        start = time.perf_counter()
        try:
            reply = await stub.Step(run.pending(), timeout=config.timeout)
        except grpc.RpcError as exc:
            _fail(run, result, exc.code().name)
            return
        result.ok(per_message, time.perf_counter() - start)
        run.answered(from_tensor(reply.outputs) if run.record is not None else None)


async def _stream(stub: Any, runs: list[_Run], config: LoadConfig, result: LoadResult, deadline: float) -> None:
    """One stream, its sessions interleaved: each has one request in flight, the next sent when its reply arrives."""
    call = stub.StreamSteps()
    by_id = {r.session_id: r for r in runs}
    outstanding: set[str] = set()

    async def send(run: _Run) -> None:
        run.sent_at = time.perf_counter()
        outstanding.add(run.session_id)
        await call.write(run.pending())

    try:
        for run in runs:
            await send(run)
        while outstanding:
            reply = await call.read()
            if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
                break
            run = by_id[reply.session_id]
            outstanding.discard(run.session_id)
            if reply.HasField("error"):
                _fail(run, result, grpc.StatusCode(_code(reply.error.code)).name)
                continue
            result.ok(config.steps_per_message, time.perf_counter() - run.sent_at)
            run.answered(from_tensor(reply.outputs) if run.record is not None else None)
            if not run.done() and time.perf_counter() < deadline:
                await send(run)
        await call.done_writing()
    except grpc.RpcError as exc:
        for sid in outstanding:
            _fail(by_id[sid], result, exc.code().name)


def _code(number: int) -> Any:
    return next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN).value


async def _close_sessions(client: AsyncClient, runs: list[_Run]) -> None:
    gate = asyncio.Semaphore(64)

    async def close(run: _Run) -> None:
        async with gate:
            with contextlib.suppress(grpc.RpcError):  # best effort: the session expires by its TTL anyway
                await client._stub.CloseSession(lstm_pb2.CloseSessionRequest(session_id=run.session_id), timeout=5)

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
            f"[{now - result.started:6.1f}s] {result.steps:>10,} steps  {rate:>9,.0f} steps/s  {errors} errors",
            file=sys.stderr,
            flush=True,
        )
        last_steps, last_time = result.steps, now
