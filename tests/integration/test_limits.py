"""Server limits answer RESOURCE_EXHAUSTED or evict by LRU, never crash; each on a server of its own."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_client import Client, ResourceExhausted, SessionGone
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from tests.servers import model_repository, start_server, stop_server, test_settings


def test_max_sessions_evicts_the_least_recently_used(tmp_path: Path) -> None:
    server, handle = start_server(test_settings(model_repository(tmp_path), max_sessions=2))
    try:
        with server.client() as client:
            a = client.create_session("golden_l1_nohead")
            b = client.create_session("golden_l1_nohead")
            a.step(np.zeros(3))  # b is now the least recently used
            c = client.create_session("golden_l1_nohead")
            with pytest.raises(SessionGone) as err:
                b.step(np.zeros(3))
            assert err.value.reason == "evicted"
            assert "max_sessions=2" in err.value.message
            a.step(np.zeros(3))
            c.step(np.zeros(3))
    finally:
        stop_server(server, handle)


def test_max_concurrent_rpcs(tmp_path: Path) -> None:
    server, handle = start_server(test_settings(model_repository(tmp_path), max_concurrent_rpcs=2))
    channel = grpc.insecure_channel(server.target)
    stub = lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]
    feeds: list[queue.SimpleQueue[lstm_pb2.StepRequest | None]] = [queue.SimpleQueue() for _ in range(2)]

    def feed(q: queue.SimpleQueue[lstm_pb2.StepRequest | None]) -> Iterator[lstm_pb2.StepRequest]:
        while (r := q.get()) is not None:
            yield r

    try:
        streams = [stub.StreamSteps(feed(q)) for q in feeds]  # two long-lived calls hold both slots
        for q, stream in zip(feeds, streams, strict=True):
            q.put(lstm_pb2.StepRequest(session_id="nobody", seq=1))
            assert next(stream).HasField("error")  # answered in-band: the call is running on the server
        with Client(server.target, timeout=5.0) as client, pytest.raises(ResourceExhausted):
            client.list_models()
        for q in feeds:
            q.put(None)
        for s in streams:
            assert list(s) == []
        with Client(server.target) as client:  # the slots are free again
            assert client.list_models()
    finally:
        channel.close()
        stop_server(server, handle)
