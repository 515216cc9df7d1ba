"""Hostile or careless clients (issue 9): each case was reproduced against the first wave's server and answered
wrongly (INTERNAL, UNKNOWN with a traceback, a silently wrong reply, a starved health check, a flooded log, CANCELLED
at shutdown). Each test here failed before its fix."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstm_client import Client, InvalidArgument, SequenceError
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client.errors import error_from_detail, error_from_rpc
from lstm_client.tensor import to_tensor
from lstm_serve.sessions import snapshot as snapshots
from tests.servers import RunningServer, model_repository, start_server, stop_server, test_settings

MODEL = "golden_l1_nohead"  # 3 inputs


def _crc_twin(x: np.ndarray) -> np.ndarray:
    """Other float32 inputs of the same shape with the same CRC-32 (the first wave's retry check): CRC-32 is affine
    over GF(2), so flipping a set of low mantissa bits whose CRC contributions cancel leaves it unchanged."""
    data = bytearray(x.astype("<f4").tobytes())
    n = len(data)
    zero = zlib.crc32(bytes(n))
    bits = [(i * 4, b) for i in range(n // 4) for b in range(12)]  # the 12 low mantissa bits of every float
    rows = []
    for byte0, bit in bits:
        flip = bytearray(n)
        flip[byte0 + bit // 8] = 1 << (bit % 8)
        rows.append(zlib.crc32(bytes(flip)) ^ zero)
    # Gaussian elimination for a non-empty subset of rows that XORs to 0 (more rows than 32 bits: one exists)
    basis: dict[int, tuple[int, int]] = {}  # pivot bit -> (value, subset mask)
    for index, value in enumerate(rows):
        mask = 1 << index
        while value:
            pivot = value.bit_length() - 1
            if pivot not in basis:
                basis[pivot] = (value, mask)
                break
            value, mask = value ^ basis[pivot][0], mask ^ basis[pivot][1]
        else:
            for i, (byte0, bit) in enumerate(bits):
                if mask >> i & 1:
                    data[byte0 + bit // 8] ^= 1 << (bit % 8)
            twin = np.frombuffer(bytes(data), "<f4").reshape(x.shape).astype(np.float32)
            assert zlib.crc32(twin.tobytes()) == zlib.crc32(x.astype("<f4").tobytes())
            assert not np.array_equal(twin, x)
            return twin
    raise AssertionError("no CRC-32 collision found")


def test_a_retry_with_other_inputs_that_collide_in_crc32_is_refused(client: Client) -> None:
    x = np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)
    twin = _crc_twin(x)
    session = client.create_session(MODEL)
    first = session.step(x)
    session.seq -= 1  # resend seq 1, with the colliding inputs
    with pytest.raises(SequenceError) as err:
        session.step(twin)
    assert err.value.reason == "retry_mismatch"
    assert session.info().seq == 1
    session.seq = 0
    np.testing.assert_array_equal(session.step(x), first)  # the true retry still replays


@pytest.fixture
def raw(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def _raw_unary(channel: grpc.Channel, method: str, data: bytes) -> grpc.RpcError:
    call = channel.unary_unary(f"/lstm.v1.LstmService/{method}", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        call(data, timeout=10)
    return err.value


def _scrape(server: RunningServer, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("method", ["ListModels", "CreateSession", "GetSession", "Step", "Predict", "CloseSession"])
def test_junk_bytes_are_invalid_argument_and_counted(server: RunningServer, raw: grpc.Channel, method: str) -> None:
    before = _scrape(server, "lstm_rpcs_total", method=method, code="INVALID_ARGUMENT")
    err = _raw_unary(raw, method, b"\xff\xff\xff\xff junk")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "malformed" in (err.details() or "")
    assert error_from_rpc(err).reason == "bad_input"
    assert _scrape(server, "lstm_rpcs_total", method=method, code="INVALID_ARGUMENT") == before + 1


def test_junk_bytes_on_a_stream_are_answered_in_band_and_the_stream_goes_on(client: Client, raw: grpc.Channel) -> None:
    session = client.create_session(MODEL)
    good = lstm_pb2.StepRequest(session_id=session.id, seq=1, inputs=to_tensor(np.ones(3, np.float32)))
    stream = raw.stream_stream("/lstm.v1.LstmService/StreamSteps", request_serializer=None, response_deserializer=None)
    replies = [lstm_pb2.StepReply.FromString(r) for r in stream(iter([b"\x0a\xff\xff", good.SerializeToString()]))]
    assert len(replies) == 2
    errors = [r for r in replies if r.HasField("error")]
    assert len(errors) == 1
    assert isinstance(error_from_detail(errors[0].error), InvalidArgument)
    assert [r.seq for r in replies if not r.HasField("error")] == [1]


def test_a_huge_shape_with_no_data_is_invalid_argument(client: Client, raw: grpc.Channel) -> None:
    session = client.create_session(MODEL)
    tensor = lstm_pb2.Tensor(shape=[0, 2**32 - 1, 2**32 - 1, 2**32 - 1], data=b"")
    request = lstm_pb2.StepRequest(session_id=session.id, seq=1, inputs=tensor)
    err = _raw_unary(raw, "Step", request.SerializeToString())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert session.info().seq == 0


def test_a_session_id_with_a_trailing_newline_is_refused(client: Client) -> None:
    with pytest.raises(InvalidArgument):
        client.create_session(MODEL, session_id="victim\n")
    client.create_session(MODEL, session_id="victim")
    with pytest.raises(InvalidArgument):
        client.session_info("victim\n")


def test_a_flood_of_refusals_does_not_flood_the_log(
    client: Client, raw: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    stream = raw.stream_stream("/lstm.v1.LstmService/StreamSteps", request_serializer=None, response_deserializer=None)
    unknown = [
        lstm_pb2.StepRequest(session_id=f"nobody-{i}", seq=1, inputs=to_tensor(np.ones(3, np.float32)))
        for i in range(2000)
    ]
    with caplog.at_level(logging.INFO, logger="lstm_serve.service"):
        replies = list(stream(iter([r.SerializeToString() for r in unknown]), timeout=60))
    assert len(replies) == 2000
    refusals = [r for r in caplog.records if r.name == "lstm_serve.service" and "NOT_FOUND" in r.getMessage()]
    assert 0 < len(refusals) <= 300, len(refusals)  # a burst of 100, then 20 a second


# --- servers of their own: limits, idle streams, long requests, the drain -----------------------------------------


@pytest.fixture
def own_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    overrides: dict[str, object] = getattr(request, "param", {})
    running, handle = start_server(test_settings(model_repository(tmp_path / "models"), **overrides))
    yield running
    stop_server(running, handle)


def _health(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@pytest.mark.parametrize("own_server", [{"max_calls_per_peer": 8, "max_concurrent_rpcs": 1000}], indirect=True)
async def test_idle_streams_cannot_starve_anyone_else_or_the_health_check(own_server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(own_server.target) as channel:
        stub = lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]
        idle = [stub.StreamSteps() for _ in range(8)]
        for call in idle:
            await call.wait_for_connection()
        await asyncio.sleep(0.2)  # the server has entered all eight
        extra = stub.StreamSteps()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await extra.read()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "from your address" in (err.value.details() or "")
        assert await asyncio.to_thread(_health, own_server.target) == "SERVING"
        for call in idle:
            call.cancel()
        await asyncio.sleep(0.2)
    with Client(own_server.target) as client:
        assert client.list_models()  # the slots came back


@pytest.mark.parametrize("own_server", [{"stream_idle_timeout": 0.3}], indirect=True)
def test_an_idle_stream_is_ended_and_the_client_reconnects_by_itself(own_server: RunningServer) -> None:
    def slow_inputs() -> Iterator[np.ndarray]:
        for i in range(3):
            if i == 2:
                time.sleep(1.0)  # idle past the limit: the server ends the stream meanwhile
            yield np.full(3, float(i), np.float32)

    with Client(own_server.target) as client:
        session = client.create_session(MODEL)
        got = list(session.stream(slow_inputs()))
        expected = client.predict(MODEL, np.stack([np.full(3, float(i), np.float32) for i in range(3)])).outputs
        np.testing.assert_allclose(np.stack(got), expected, atol=1e-5)
        assert session.info().seq == 3


@pytest.mark.parametrize("own_server", [{"max_steps_per_request": 4096}], indirect=True)
def test_long_requests_do_not_hold_the_loop_for_short_ones(own_server: RunningServer) -> None:
    """Four 4096-step Predicts and then one short Step: the short one must not wait for the long ones (before the
    fix they ran on the event loop, and the short step finished last)."""
    long = np.random.default_rng(0).standard_normal((4096, 3)).astype(np.float32)
    finished: dict[str, float] = {}
    with Client(own_server.target) as client:
        session = client.create_session(MODEL)

        def predict(i: int) -> None:
            client.predict(MODEL, long)
            finished[f"predict-{i}"] = time.perf_counter()

        threads = [threading.Thread(target=predict, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.02)
        session.step(np.ones(3, np.float32))
        finished["step"] = time.perf_counter()
        for t in threads:
            t.join(60)
    assert finished["step"] < max(v for k, v in finished.items() if k != "step")


def test_shutdown_answers_calls_in_progress_and_sends_new_ones_elsewhere(tmp_path: Path) -> None:
    """SIGTERM under load: no caller sees CANCELLED or INTERNAL; calls in progress are answered; later ones get
    UNAVAILABLE (which clients retry); streams answer what they took and end with UNAVAILABLE; and the state the
    server keeps is exactly what its callers were told (read back from the snapshot written at the end)."""
    snapshot = tmp_path / "s.snap"
    running, handle = start_server(test_settings(model_repository(tmp_path / "models"), snapshot=snapshot))
    with Client(running.target) as client:
        ids = [client.create_session(MODEL).id for _ in range(8)]
    answered = dict.fromkeys(ids, 0)
    codes: list[grpc.StatusCode] = []
    stop = threading.Event()

    def unary(sid: str) -> None:
        with grpc.insecure_channel(running.target) as channel:
            step = lstm_pb2_grpc.LstmServiceStub(channel).Step  # type: ignore[no-untyped-call]
            while not stop.is_set():
                request = lstm_pb2.StepRequest(session_id=sid, seq=answered[sid] + 1, inputs=to_tensor(np.ones(3)))
                try:
                    step(request, timeout=10)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    return
                answered[sid] += 1

    def stream(sid: str) -> None:
        with grpc.insecure_channel(running.target) as channel:
            stub = lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]
            sent = iter(range(10**6))

            def requests() -> Iterator[lstm_pb2.StepRequest]:
                for n in sent:
                    if stop.is_set():
                        return
                    yield lstm_pb2.StepRequest(session_id=sid, seq=n + 1, inputs=to_tensor(np.ones(3)))
                    while answered[sid] < n + 1 and not stop.is_set():  # one in flight, like the client
                        time.sleep(0.0005)

            try:
                for reply in stub.StreamSteps(requests(), timeout=30):
                    assert not reply.HasField("error"), reply.error
                    answered[sid] += 1
            except grpc.RpcError as exc:
                codes.append(exc.code())

    workers = [threading.Thread(target=unary if i % 2 else stream, args=(sid,)) for i, sid in enumerate(ids)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    stop_server(running, handle)  # App.stop: the drain, then the snapshot
    stop.set()
    for w in workers:
        w.join(30)
    assert set(codes) <= {grpc.StatusCode.UNAVAILABLE}, codes
    assert sum(answered.values()) > 0
    stored = {s.id: s.seq for s in snapshots.read(snapshot).sessions}
    assert stored == answered  # nothing applied unanswered, nothing answered unapplied
