"""Locust load test for teams that already run locust: every simulated user is one lstm-serve session.

    locust -f tests/load/locustfile.py --host 127.0.0.1:50051            # web UI on :8089
    locust -f tests/load/locustfile.py --host 127.0.0.1:50051 --headless -u 200 -r 50 -t 60s
    LSTM_MODEL=elnino LSTM_STEPS_PER_MESSAGE=4 locust -f ...             # model and request size

Each user creates a session on start, sends Step requests (random inputs, automatic sequence numbers) and closes
the session on stop. Every call is reported to locust as request type "grpc", named after the RPC.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc.experimental.gevent as grpc_gevent  # type: ignore[import-not-found]
import numpy as np
from locust import User, between, task

from lstm_client import Client, LstmError, Session

grpc_gevent.init_gevent()  # gRPC must cooperate with gevent, or one user blocks them all

MODEL = os.environ.get("LSTM_MODEL", "elnino")
STEPS_PER_MESSAGE = int(os.environ.get("LSTM_STEPS_PER_MESSAGE", "1"))
T = TypeVar("T")


class LstmSessionUser(User):
    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        if not self.host:
            raise ValueError("give the server as --host HOST:PORT")
        self.client = Client(self.host)
        self.rng = np.random.default_rng()
        self.input_size = self._timed("GetModel", lambda: self.client.get_model(MODEL)).input_size
        self.session: Session = self._timed("CreateSession", lambda: self.client.create_session(MODEL, ttl=600))

    def on_stop(self) -> None:
        self._timed("CloseSession", self.session.close)
        self.client.close()

    @task
    def step(self) -> None:
        shape = (self.input_size,) if STEPS_PER_MESSAGE == 1 else (STEPS_PER_MESSAGE, self.input_size)
        x = self.rng.standard_normal(shape).astype(np.float32)
        self._timed("Step", lambda: self.session.step(x))

    def _timed(self, name: str, call: Callable[[], T]) -> T:
        start = time.perf_counter()
        exception: Exception | None = None
        result: Any = None
        try:
            result = call()
        except LstmError as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=0,
            exception=exception,
            context={},
        )
        if exception is not None:
            raise exception
        return result  # type: ignore[no-any-return]
