"""GetServerInfo tells the limits the server enforces: each number read here is then checked against what the server
does at and past it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import grpc
import numpy as np
import pytest

import lstm_serve
from lstm_client import AsyncClient, Client, InvalidArgument, ResourceExhausted
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_serve.service.servicer import STREAM_WINDOW
from tests.servers import RunningServer, model_repository, start_server, stop_server, test_settings

MODEL = "golden_l3_head"  # 4 input features
SETTINGS = {
    "max_sessions": 77,
    "max_sessions_policy": "refuse",
    "max_sessions_per_tenant": 5,
    "session_ttl": 90.0,
    "tenant_rate": 500.0,
    "max_calls_per_peer": 40,
    "max_concurrent_rpcs": 60,
    "stream_idle_timeout": 12.0,
}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    models = model_repository(tmp_path_factory.mktemp("models"))
    server, handle = start_server(test_settings(models, **SETTINGS))
    yield server
    stop_server(server, handle)


def test_the_raw_reply_names_versions_and_every_limit(limited: RunningServer) -> None:
    with grpc.insecure_channel(limited.target) as channel:
        stub = lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.GetServerInfo(lstm_pb2.GetServerInfoRequest(), timeout=10)
    assert (reply.server_version, reply.protocol) == (lstm_serve.__version__, "lstm.v1")
    limits = reply.limits
    assert limits.max_steps_per_request == 512  # tests/servers.py's test_settings
    assert limits.max_message_bytes == 256 * 1024
    assert limits.max_stream_requests_in_flight == STREAM_WINDOW
    assert (limits.max_sessions, limits.max_sessions_policy, limits.max_sessions_per_tenant) == (77, "refuse", 5)
    assert limits.default_idle_ttl.ToTimedelta() == timedelta(seconds=90)
    assert limits.max_idle_ttl.ToTimedelta() > timedelta(days=365)
    assert limits.max_session_id_length == 128
    assert (limits.max_calls_per_peer, limits.max_calls) == (40, 60)
    assert limits.stream_idle_timeout.ToTimedelta() == timedelta(seconds=12)
    assert (limits.tenant_rate, limits.tenant_burst) == (500.0, 500)  # burst 0: one second's worth


def test_the_limits_told_are_the_limits_kept(limited: RunningServer) -> None:
    with Client(limited.target) as client:
        info = client.server_info()
        with client.create_session(MODEL) as session:
            assert session.info().idle_ttl == info.default_idle_ttl
            session.step(np.zeros((info.max_steps_per_request, 4)))  # at the limit: served
            with pytest.raises(ResourceExhausted):
                session.step(np.zeros((info.max_steps_per_request + 1, 4)))
        longest = "i" * info.max_session_id_length
        client.create_session(MODEL, session_id=longest).close()
        with pytest.raises(InvalidArgument):
            client.create_session(MODEL, session_id=longest + "i")
        with pytest.raises(InvalidArgument):
            client.create_session(MODEL, ttl=info.max_idle_ttl + timedelta(seconds=1))
        # the tenant's sessions (every client is one tenant without tokens): max_sessions_per_tenant, then refused
        sessions = [client.create_session(MODEL) for _ in range(info.max_sessions_per_tenant)]
        with pytest.raises(ResourceExhausted) as caught:
            client.create_session(MODEL)
        assert caught.value.reason == "capacity"
        for session in sessions:
            session.close()


async def test_the_async_client_reads_it_too(limited: RunningServer) -> None:
    async with AsyncClient(limited.target) as client:
        info = await client.server_info()
    assert info.protocol == "lstm.v1"
    assert info.max_sessions == 77
    assert info.stream_idle_timeout == timedelta(seconds=12)
