"""The client across failover: connections reset mid-call (tests/faults.py), streams ended early, a server down for a
while. Steps are resent with their original seq, so every output matches Predict and nothing is applied twice."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_client import AsyncClient, Client, RetryPolicy
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client._retry import AFFINITY_KEY
from lstm_client.loadtest import LoadConfig, run_load
from tests.faults import FaultProxy
from tests.golden import TOLERANCE
from tests.servers import RunningServer

MODEL = "golden_l2_wide"  # 6 inputs, 3 outputs
STEPS = 60
QUICK = RetryPolicy(initial_backoff=0.01, max_backoff=0.1, budget=10.0)


def _inputs(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((STEPS, 6)).astype(np.float32)


@pytest.fixture
def proxy(server: RunningServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", server.app.port) as p:
        yield p


def _check(server: RunningServer, session_id: str, xs: np.ndarray, got: np.ndarray) -> None:
    """Outputs equal Predict on the same inputs, and the server applied each step exactly once."""
    with server.client() as direct:
        expected = direct.predict(MODEL, xs).outputs
        info = direct.session_info(session_id)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    assert (info.seq, info.steps) == (len(xs), len(xs))


def test_a_stream_survives_reset_connections(server: RunningServer, proxy: FaultProxy) -> None:
    xs = _inputs(1)
    with Client(proxy.target, retry=QUICK, timeout=5.0) as client:
        session = client.create_session(MODEL)
        proxy.cut_after(500, times=3)  # replies cut off: some steps applied, their replies lost
        got = np.stack(list(session.stream(xs)))
    assert proxy.cuts_pending() == 0
    assert proxy.resets >= 3
    assert session.seq == STEPS
    _check(server, session.id, xs, got)


def test_a_stream_survives_requests_cut_off(server: RunningServer, proxy: FaultProxy) -> None:
    xs = _inputs(2)
    with Client(proxy.target, retry=QUICK, timeout=5.0) as client:
        session = client.create_session(MODEL)
        proxy.cut_after(700, direction="up", times=3)  # requests cut off: some never reach the server
        got = np.stack(list(session.stream(xs)))
    assert proxy.cuts_pending() == 0
    _check(server, session.id, xs, got)


async def test_an_async_stream_survives_reset_connections(server: RunningServer, proxy: FaultProxy) -> None:
    xs = _inputs(3)
    async with AsyncClient(proxy.target, retry=QUICK, timeout=5.0) as client:
        session = await client.create_session(MODEL)
        proxy.cut_after(500, direction="both", times=4)
        got = np.stack([y async for y in session.stream(xs)])
    assert proxy.cuts_pending() == 0
    assert session.seq == STEPS
    await asyncio.to_thread(_check, server, session.id, xs, got)


def test_unary_steps_outlast_a_server_outage(server: RunningServer, proxy: FaultProxy) -> None:
    """Every connection reset, and new ones refused for 0.6 s: a replica restarting."""
    xs = _inputs(4)
    retried: list[BaseException] = []
    with Client(proxy.target, retry=QUICK, timeout=5.0) as client:
        client._on_retry = retried.append
        session = client.create_session(MODEL, session_id=f"outage-{threading.get_ident()}")
        got = [session.step(x) for x in xs[:20]]
        proxy.outage(0.6)
        got += [session.step(x) for x in xs[20:]]
    assert retried  # the outage was seen, and outlasted
    _check(server, session.id, xs, np.stack(got))


async def test_async_unary_steps_outlast_a_server_outage(server: RunningServer, proxy: FaultProxy) -> None:
    xs = _inputs(5)
    async with AsyncClient(proxy.target, retry=QUICK, timeout=5.0) as client:
        session = await client.create_session(MODEL)
        got = [await session.step(x) for x in xs[:20]]
        proxy.outage(0.6)
        got += [await session.step(x) for x in xs[20:]]
    await asyncio.to_thread(_check, server, session.id, xs, np.stack(got))


@pytest.mark.parametrize(("mode", "sessions_per_stream"), [("stream", 4), ("stream", 1), ("unary", 1)])
def test_the_load_generator_ends_without_errors_through_reset_connections(
    server: RunningServer, proxy: FaultProxy, mode: str, sessions_per_stream: int
) -> None:
    config = LoadConfig(
        target=proxy.target,
        model=MODEL,
        sessions=16,
        steps=20,
        mode=mode,  # type: ignore[arg-type]
        sessions_per_stream=sessions_per_stream,
        duration=60.0,
        timeout=5.0,
        seed=11,
        record=True,
    )
    proxy.cut_after(3000, direction="both", times=4)  # also hits session creation, closing and verification
    result = asyncio.run(run_load(config))
    assert dict(result.errors) == {}
    assert result.steps == 16 * 20
    assert (result.verified, result.mismatched) == (16, 0)
    assert result.retries >= 1
    assert proxy.resets >= 1
    assert result.summary()["retries"] == result.retries


# The x-session-id header and a stream that ends early, against a recording stand-in for the server.


class Recorder(lstm_pb2_grpc.LstmServiceServicer):
    """Answers session calls with canned replies (outputs = inputs) and records each call's metadata."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.end_streams_early = 0  # so many StreamSteps calls end (OK) after their first reply
        self._lock = threading.Lock()

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls.append((method, dict(context.invocation_metadata())))

    def _info(self, session_id: str) -> lstm_pb2.SessionInfo:
        return lstm_pb2.SessionInfo(session_id=session_id or "generated-id", model="m")

    def CreateSession(self, request: Any, context: grpc.ServicerContext) -> lstm_pb2.SessionInfo:
        self._record("CreateSession", context)
        return self._info(request.session_id)

    def GetSession(self, request: Any, context: grpc.ServicerContext) -> lstm_pb2.SessionInfo:
        self._record("GetSession", context)
        return self._info(request.session_id)

    def ResetSession(self, request: Any, context: grpc.ServicerContext) -> lstm_pb2.SessionInfo:
        self._record("ResetSession", context)
        return self._info(request.session_id)

    def CloseSession(self, request: Any, context: grpc.ServicerContext) -> lstm_pb2.CloseSessionResponse:
        self._record("CloseSession", context)
        return lstm_pb2.CloseSessionResponse(session=self._info(request.session_id))

    def Step(self, request: Any, context: grpc.ServicerContext) -> lstm_pb2.StepResponse:
        self._record("Step", context)
        return lstm_pb2.StepResponse(session_id=request.session_id, seq=request.seq, outputs=request.inputs)

    def StreamSteps(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[lstm_pb2.StepReply]:
        self._record("StreamSteps", context)
        with self._lock:
            end_early = self.end_streams_early > 0
            self.end_streams_early -= end_early
        for request in requests:
            yield lstm_pb2.StepReply(session_id=request.session_id, seq=request.seq, outputs=request.inputs)
            if end_early:
                return


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    rec = Recorder()
    stand_in = grpc.server(ThreadPoolExecutor(4))
    lstm_pb2_grpc.add_LstmServiceServicer_to_server(rec, stand_in)  # type: ignore[no-untyped-call]
    port = stand_in.add_insecure_port("127.0.0.1:0")
    stand_in.start()
    yield rec, f"127.0.0.1:{port}"
    stand_in.stop(None)


SESSION_CALLS = ["CreateSession", "Step", "StreamSteps", "StreamSteps", "ResetSession", "GetSession", "CloseSession"]


def test_session_calls_carry_the_session_id_header(recorder: tuple[Recorder, str]) -> None:
    rec, target = recorder
    rec.end_streams_early = 1  # the first stream ends after one reply: reopened, the next step sent on a new one
    with Client(target, retry=QUICK) as client, client.create_session("m", session_id="dev-7") as session:
        session.step([1.0, 2.0])
        assert [y.tolist() for y in session.stream([[3.0], [4.0]])] == [[3.0], [4.0]]
        session.reset()
        session.info()
    assert [name for name, _ in rec.calls] == SESSION_CALLS
    assert all(meta.get(AFFINITY_KEY) == "dev-7" for _, meta in rec.calls)


async def test_async_session_calls_carry_the_session_id_header(recorder: tuple[Recorder, str]) -> None:
    rec, target = recorder
    rec.end_streams_early = 1
    async with AsyncClient(target, retry=QUICK) as client:
        session = await client.create_session("m", session_id="dev-8")
        await session.step([1.0, 2.0])
        assert [y.tolist() async for y in session.stream([[3.0], [4.0]])] == [[3.0], [4.0]]
        await session.reset()
        await session.info()
        await session.close()
    assert [name for name, _ in rec.calls] == SESSION_CALLS
    assert all(meta.get(AFFINITY_KEY) == "dev-8" for _, meta in rec.calls)


def test_calls_about_no_session_carry_no_header(recorder: tuple[Recorder, str]) -> None:
    rec, target = recorder
    with Client(target) as client:
        session = client.create_session("m")  # the server picks the id: nothing to hash on yet
    assert session.id == "generated-id"
    [(method, metadata)] = rec.calls
    assert method == "CreateSession"
    assert AFFINITY_KEY not in metadata
