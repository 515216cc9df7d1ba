"""StreamSteps: many sessions on one stream, in-band errors, and order within each session."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from lstm_client import Client, SequenceError
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client.tensor import from_tensor, to_tensor
from tests.golden import TOLERANCE, golden
from tests.servers import RunningServer


@pytest.fixture
def stub(server: RunningServer) -> Iterator[lstm_pb2_grpc.LstmServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]


def test_one_stream_carries_many_sessions_pipelined(stub: lstm_pb2_grpc.LstmServiceStub, client: Client) -> None:
    """All requests are sent before any reply is read: sessions interleave, each session's steps stay in order."""
    g = golden("golden_l3_head")
    B, T = g.inputs.shape[:2]
    sessions = [client.create_session("golden_l3_head") for _ in range(B)]
    expected = [client.predict("golden_l3_head", g.inputs[b]).outputs for b in range(B)]
    requests = [
        lstm_pb2.StepRequest(session_id=sessions[b].id, seq=t + 1, inputs=to_tensor(g.inputs[b, t]))
        for t in range(T)
        for b in range(B)
    ]
    replies = list(stub.StreamSteps(iter(requests)))
    assert len(replies) == B * T
    by_session: dict[str, list[lstm_pb2.StepReply]] = {}
    for reply in replies:
        assert not reply.HasField("error"), reply.error.message
        by_session.setdefault(reply.session_id, []).append(reply)
    for b, session in enumerate(sessions):
        mine = by_session[session.id]
        assert [r.seq for r in mine] == list(range(1, T + 1))  # in order within the session
        got = np.stack([from_tensor(r.outputs) for r in mine])
        np.testing.assert_allclose(got, expected[b], atol=TOLERANCE, rtol=0)


def test_bad_requests_are_answered_in_band_and_the_stream_goes_on(
    stub: lstm_pb2_grpc.LstmServiceStub, client: Client
) -> None:
    g = golden("golden_l1_nohead")
    session = client.create_session("golden_l1_nohead")
    x = g.inputs[0]
    expected = client.predict("golden_l1_nohead", x).outputs
    sid = session.id
    requests: queue.SimpleQueue[lstm_pb2.StepRequest | None] = queue.SimpleQueue()

    def feed() -> Iterator[lstm_pb2.StepRequest]:
        while (r := requests.get()) is not None:
            yield r

    replies = stub.StreamSteps(feed())

    def exchange(session_id: str, seq: int, inputs: lstm_pb2.Tensor) -> lstm_pb2.StepReply:
        requests.put(lstm_pb2.StepRequest(session_id=session_id, seq=seq, inputs=inputs))
        reply: lstm_pb2.StepReply = next(replies)
        return reply

    ok = exchange(sid, 1, to_tensor(x[0]))
    np.testing.assert_allclose(from_tensor(ok.outputs), expected[0], atol=TOLERANCE)
    bad = [
        exchange(sid, 2, to_tensor([1.0, 2.0])),
        exchange(sid, 2, to_tensor([np.nan, 0.0, 0.0])),
        exchange(sid, 9, to_tensor(x[1])),
        exchange("nobody", 1, to_tensor(x[1])),
        exchange(sid, 2, lstm_pb2.Tensor()),
    ]
    assert [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 2 == [r.error.code for r in bad[:2]]
    assert bad[2].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert bad[2].error.expected_seq == 2
    assert bad[3].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert bad[4].error.reason == "bad_input"
    assert all(r.session_id and not r.HasField("outputs") for r in bad)
    retry = exchange(sid, 1, to_tensor(x[0]))  # a retry of seq 1 on the same stream: the stored reply
    assert retry.outputs == ok.outputs
    for t in range(1, len(x)):
        reply = exchange(sid, t + 1, to_tensor(x[t]))
        np.testing.assert_allclose(from_tensor(reply.outputs), expected[t], atol=TOLERANCE, rtol=0)
    requests.put(None)
    assert list(replies) == []


def test_client_stream_raises_in_band_errors_as_exceptions(client: Client) -> None:
    session = client.create_session("golden_l1_nohead")
    session.step(np.zeros(3))
    session.seq = 5  # out of step with the server
    with pytest.raises(SequenceError) as err:
        list(session.stream([np.zeros(3)]))
    assert err.value.expected_seq == 2
    assert session.resync() == 1
    assert len(list(session.stream(np.zeros((4, 3))))) == 4


def test_many_threads_many_sessions(server: RunningServer) -> None:
    """Concurrent sessions from several threads: each gets exactly its own sequence's outputs."""
    g = golden("golden_l2_wide")
    with server.client() as client:
        expected = [client.predict("golden_l2_wide", g.inputs[b]).outputs for b in range(2)]
    failures: list[BaseException] = []

    def worker(b: int) -> None:
        try:
            with server.client() as c, c.create_session("golden_l2_wide") as s:
                got = np.stack(list(s.stream(g.inputs[b])))
                np.testing.assert_allclose(got, expected[b], atol=TOLERANCE, rtol=0)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i % 2,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
