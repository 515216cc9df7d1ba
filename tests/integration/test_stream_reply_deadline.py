"""A step stream waits for a reply at most the client's `timeout`, then treats the stream as broken (reopened and
resent under the retry policy). (Found in review: a stalled server or a silently dead connection hung
Session.stream() for ever.)"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from datetime import UTC, datetime

import grpc

from lstm_client import Client, RetryPolicy
from lstm_client._calls import SessionInfo
from lstm_client.client import Session


def test_stream_step_is_bounded_by_the_client_timeout() -> None:
    release = threading.Event()

    def stalled(requests, context):  # type: ignore[no-untyped-def]
        next(requests)
        release.wait(20)  # a server that took the request and never answers
        return iter(())

    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "lstm.v1.LstmService",
                {
                    "StreamSteps": grpc.stream_stream_rpc_method_handler(stalled),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    outcome: list[object] = []
    try:
        client = Client(f"127.0.0.1:{port}", timeout=1.0, retry=RetryPolicy(budget=0))
        now = datetime.now(UTC)
        session = Session(client, SessionInfo("s1", "elnino", 0, 0, now, now, None))

        def run() -> None:
            try:
                outcome.append(list(session.stream([[0.1]])))
            except Exception as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        start = time.monotonic()
        worker.start()
        worker.join(5)
        waited = time.monotonic() - start
        hung = worker.is_alive()
    finally:
        release.set()
        server.stop(0)
    assert not hung, f"Session.stream() still waiting after {waited:.1f} s with Client(timeout=1.0)"
