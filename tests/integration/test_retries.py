"""Client retries are safe: a step whose reply was lost is resent with its seq and applied exactly once."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_client import AlreadyExists, Client, RetryPolicy, Unavailable
from tests.golden import TOLERANCE, golden
from tests.servers import RunningServer


class _LostReply(grpc.RpcError, grpc.Call):
    """What the client sees when the connection drops after the server applied the step."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset (simulated)"

    def trailing_metadata(self) -> tuple[()]:
        return ()


class DropFirstReplies(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Lets the first `count` calls of `method` reach the server, then throws their replies away (or, with
    `reach_server=False`, fails them before they are sent)."""

    def __init__(self, count: int, method: str = "Step", *, reach_server: bool = True) -> None:
        self.count = count
        self.method = method
        self.reach_server = reach_server
        self.dropped = 0

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        if not details.method.endswith(f"/{self.method}") or self.dropped >= self.count:
            return continuation(details, request)
        if self.reach_server:
            continuation(details, request).result()  # the server has applied the call
        self.dropped += 1
        raise _LostReply()


def test_lost_replies_are_retried_without_applying_twice(server: RunningServer) -> None:
    g = golden("golden_l3_head")
    x = g.inputs[2]
    dropper = DropFirstReplies(count=2)
    with server.client() as plain:
        expected = plain.predict("golden_l3_head", x).outputs
    retry = RetryPolicy(attempts=4, initial_backoff=0.01)
    with Client(server.target, interceptors=[dropper], retry=retry) as client:
        session = client.create_session("golden_l3_head")
        got = np.stack([session.step(x[t]) for t in range(len(x))])
        assert dropper.dropped == 2
        info = session.info()
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    assert (info.seq, info.steps) == (len(x), len(x))  # 11 steps applied once each despite 13 Step calls


def test_unreachable_server_ends_in_unavailable_after_the_retries() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        Client(f"127.0.0.1:{port}", timeout=1.0, retry=RetryPolicy(attempts=3, initial_backoff=0.01)) as client,
        pytest.raises(Unavailable),
    ):
        client.list_models()


def test_create_session_with_an_id_is_retried_and_a_lost_reply_found(server: RunningServer) -> None:
    """The first CreateSession is applied but its reply lost; the retry's ALREADY_EXISTS is recognised as ours."""
    dropper = DropFirstReplies(count=1, method="CreateSession")
    retry = RetryPolicy(initial_backoff=0.01)
    with Client(server.target, interceptors=[dropper], retry=retry) as client:
        session = client.create_session("golden_l1_nohead", session_id=f"retried-{uuid.uuid4().hex}")
        assert dropper.dropped == 1
        assert session.seq == 0
        session.step(np.zeros(3))
        assert session.info().seq == 1
        session.close()


def test_create_session_with_an_id_still_refuses_a_session_in_use(server: RunningServer) -> None:
    """ALREADY_EXISTS on a retry, for a session that has already stepped, is not our lost reply: raised."""
    sid = f"in-use-{uuid.uuid4().hex}"
    with server.client() as plain:
        plain.create_session("golden_l1_nohead", session_id=sid).step(np.zeros(3))
    dropper = DropFirstReplies(count=1, method="CreateSession", reach_server=False)
    with (
        Client(server.target, interceptors=[dropper], retry=RetryPolicy(initial_backoff=0.01)) as client,
        pytest.raises(AlreadyExists),
    ):
        client.create_session("golden_l1_nohead", session_id=sid)
    assert dropper.dropped == 1


def test_create_session_without_an_id_is_not_retried(server: RunningServer) -> None:
    """The server picks the id: a retry after a lost reply would leave a second session behind."""
    dropper = DropFirstReplies(count=1, method="CreateSession")
    with (
        Client(server.target, interceptors=[dropper], retry=RetryPolicy(initial_backoff=0.01)) as client,
        pytest.raises(Unavailable),
    ):
        client.create_session("golden_l1_nohead")
    assert dropper.dropped == 1
