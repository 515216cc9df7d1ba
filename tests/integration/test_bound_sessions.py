"""Sessions bound to their step stream (issue 13, metadata lstm-bind-sessions): closed when the client ends the
stream, closed after the grace when it breaks, kept when the client reconnects within the grace."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from lstm_client import AsyncClient, Client, SessionGone
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client.tensor import to_tensor
from tests.golden import FIXTURES, write_model_dir
from tests.servers import RunningServer, start_server, stop_server, test_settings

GRACE = 0.5
BIND = (("lstm-bind-sessions", "1"),)


@pytest.fixture(scope="module")
def bound_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("bound_models")
    write_model_dir(root, "m", FIXTURES / "golden_l1_nohead.npz")
    running, handle = start_server(test_settings(root, bound_session_grace=GRACE))
    yield running
    stop_server(running, handle)


def _closed(client: Client, session_id: str, within: float) -> bool:
    """Whether the session is closed within `within` seconds (polled, bounded)."""
    deadline = time.monotonic() + within
    while True:
        try:
            client.session_info(session_id)
        except SessionGone as gone:
            return gone.reason == "closed"
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _step(session_id: str, seq: int) -> lstm_pb2.StepRequest:
    return lstm_pb2.StepRequest(session_id=session_id, seq=seq, inputs=to_tensor(np.ones(3, np.float32)))


def test_a_stream_the_client_ends_closes_its_sessions(bound_server: RunningServer) -> None:
    xs = np.ones((4, 3), np.float32)
    with bound_server.client() as client:
        kept = client.create_session("m")
        assert len(list(kept.stream(xs))) == 4  # not bound: lives on
        bound = client.create_session("m")
        assert len(list(bound.stream(xs, bind=True))) == 4
        assert _closed(client, bound.id, within=2.0)
        bound.close()  # closing it again is no error
        assert client.session_info(kept.id).seq == 4
        kept.close()


def test_the_async_client_binds_too(bound_server: RunningServer) -> None:
    async def main() -> str:
        async with AsyncClient(bound_server.target) as client:
            session = await client.create_session("m")
            outputs = [y async for y in session.stream(np.ones((3, 3), np.float32), bind=True)]
            assert len(outputs) == 3
            return session.id

    session_id = asyncio.run(main())
    with bound_server.client() as client:
        assert _closed(client, session_id, within=2.0)


def test_a_broken_stream_closes_its_sessions_after_the_grace(bound_server: RunningServer) -> None:
    with bound_server.client() as client, grpc.insecure_channel(bound_server.target) as channel:
        stub = lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]
        session = client.create_session("m")
        # a call whose requests end is ended by the client: keep it open instead, and cancel it (a crash)
        done = False

        def requests() -> Iterator[lstm_pb2.StepRequest]:
            yield _step(session.id, 1)
            deadline = time.monotonic() + 10
            while not done and time.monotonic() < deadline:
                time.sleep(0.01)

        call = stub.StreamSteps(requests(), metadata=BIND)
        assert not next(call).HasField("error")
        call.cancel()
        done = True
        assert client.session_info(session.id).seq == 1  # not at once...
        assert _closed(client, session.id, within=GRACE + 2.0)  # ...but after the grace


def test_a_reconnect_within_the_grace_keeps_the_session(bound_server: RunningServer) -> None:
    with bound_server.client() as client, grpc.insecure_channel(bound_server.target) as channel:
        stub = lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]
        for resend in (False, True):
            session = client.create_session("m")
            state = {"done": False}

            def requests(
                seq: int, state: dict[str, bool] = state, session_id: str = session.id
            ) -> Iterator[lstm_pb2.StepRequest]:
                yield _step(session_id, seq)
                deadline = time.monotonic() + 10
                while not state["done"] and time.monotonic() < deadline:
                    time.sleep(0.01)

            first = stub.StreamSteps(requests(1), metadata=BIND)
            assert not next(first).HasField("error")
            first.cancel()
            # the client is back at once: a new step, or (resend) the last step again, answered from the stored reply
            seq = 1 if resend else 2
            second = stub.StreamSteps(requests(seq), metadata=BIND)
            assert not next(second).HasField("error")
            time.sleep(GRACE + 0.5)
            assert client.session_info(session.id).seq == seq  # kept past the grace
            state["done"] = True
            list(second)  # the client ends the second stream: now it is closed
            assert _closed(client, session.id, within=2.0)


def test_a_session_bound_to_two_streams_closes_with_the_last(bound_server: RunningServer) -> None:
    with bound_server.client() as client, grpc.insecure_channel(bound_server.target) as channel:
        stub = lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]
        session = client.create_session("m")
        state = {"done": False}

        def held_open() -> Iterator[lstm_pb2.StepRequest]:
            yield _step(session.id, 1)
            deadline = time.monotonic() + 10
            while not state["done"] and time.monotonic() < deadline:
                time.sleep(0.01)

        first = stub.StreamSteps(held_open(), metadata=BIND)
        assert not next(first).HasField("error")
        second = list(stub.StreamSteps(iter([_step(session.id, 2)]), metadata=BIND))  # ended by the client
        assert not second[0].HasField("error")
        time.sleep(0.3)
        assert client.session_info(session.id).seq == 2  # the first stream still holds it
        state["done"] = True
        list(first)
        assert _closed(client, session.id, within=2.0)
