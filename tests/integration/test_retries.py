"""Client retries are safe: a step whose reply was lost is resent with its seq and applied exactly once."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_client import Client, RetryPolicy, Unavailable
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
    """Lets the first `count` Step calls reach the server, then throws their replies away."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.dropped = 0

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        response = continuation(details, request)
        if details.method.endswith("/Step") and self.dropped < self.count:
            response.result()  # the server has applied the step
            self.dropped += 1
            raise _LostReply()
        return response


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
