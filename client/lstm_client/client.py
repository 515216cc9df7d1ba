"""Blocking client. `AsyncClient` in lstm_client.aio is its twin; both build and decode through `_calls`."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import numpy.typing as npt

from lstm_client import _calls
from lstm_client._calls import ModelFailure, ModelInfo, Prediction, RetryPolicy, SessionInfo
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client.errors import ServerError, SessionGone, error_from_rpc
from lstm_client.tensor import FloatArray

T = TypeVar("T")

DEFAULT_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


class Client:
    """A connection to an lstm-serve server.

    `timeout` is the per-attempt deadline in seconds; UNAVAILABLE and DEADLINE_EXCEEDED are retried by `retry`, which
    is safe for steps because every step carries its sequence number. `interceptors` (auth, tracing, ...) wrap every
    call.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy = RetryPolicy(),
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, int | str]] = DEFAULT_OPTIONS,
        interceptors: Sequence[
            grpc.UnaryUnaryClientInterceptor[Any, Any] | grpc.StreamStreamClientInterceptor[Any, Any]
        ] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        channel = grpc.intercept_channel(self._channel, *interceptors) if interceptors else self._channel
        self._stub = lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., T], request: object, *, retry: bool = True) -> T:
        pauses = self.retry.backoffs() if retry else iter(())
        while True:
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                pause = next(pauses, None) if exc.code() in _calls.RETRYABLE_CODES else None
                if pause is None:
                    raise error_from_rpc(exc) from None
                time.sleep(pause)

    def list_models(self) -> list[ModelInfo]:
        return self.list_models_with_failures()[0]

    def list_models_with_failures(self) -> tuple[list[ModelInfo], list[ModelFailure]]:
        return _calls.model_list(self._call(self._stub.ListModels, lstm_pb2.ListModelsRequest()))

    def get_model(self, name: str) -> ModelInfo:
        return _calls.model_info(self._call(self._stub.GetModel, lstm_pb2.GetModelRequest(name=name)))

    def create_session(
        self, model: str, *, ttl: float | timedelta | None = None, session_id: str | None = None
    ) -> Session:
        """Not retried: a lost reply would leave a second session behind. `ttl=0` never expires by idleness."""
        request = _calls.create_session_request(model, ttl, session_id)
        info = _calls.session_info(self._call(self._stub.CreateSession, request, retry=False))
        return Session(self, info)

    def session(self, session_id: str) -> Session:
        """Attaches to an existing session (for example after a client restart), continuing from its seq."""
        return Session(self, self.session_info(session_id))

    def session_info(self, session_id: str) -> SessionInfo:
        request = lstm_pb2.GetSessionRequest(session_id=session_id)
        return _calls.session_info(self._call(self._stub.GetSession, request))

    def predict(
        self, model: str, xs: npt.ArrayLike, *, h0: npt.ArrayLike | None = None, c0: npt.ArrayLike | None = None
    ) -> Prediction:
        """Stateless: runs the whole sequence `xs` [T, input_size] from (h0, c0), zeros by default."""
        return _calls.prediction(self._call(self._stub.Predict, _calls.predict_request(model, xs, h0, c0)))


class Session:
    """One server-side session. Its sequence numbers are kept here; use it from one thread at a time."""

    def __init__(self, client: Client, info: SessionInfo) -> None:
        self._client = client
        self.id = info.session_id
        self.model = info.model
        self.seq = info.seq

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, model={self.model!r}, seq={self.seq})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: TracebackType | None) -> None:
        self.close()

    def step(self, x: npt.ArrayLike) -> FloatArray:
        """x of shape (input_size,) gives (output_size,); (T, input_size) gives (T, output_size)."""
        request = _calls.step_request(self.id, self.seq + 1, x)
        outputs = _calls.step_outputs(self._client._call(self._client._stub.Step, request))
        self.seq += 1
        return outputs

    def stream(self, xs: Iterable[npt.ArrayLike]) -> Iterator[FloatArray]:
        """Steps through `xs` over one bidirectional stream, yielding each prediction as it arrives.

        A broken stream is reopened and the unanswered step resent with its seq, so nothing is applied twice.
        """
        stream = _StepStream(self._client)
        try:
            for x in xs:
                request = _calls.step_request(self.id, self.seq + 1, x)
                outputs = _calls.step_outputs(stream.exchange(request))
                self.seq += 1
                yield outputs
        finally:
            stream.close()

    def info(self) -> SessionInfo:
        return self._client.session_info(self.id)

    def reset(self) -> SessionInfo:
        """Zeroes the state (h, c of every layer); seq goes on counting."""
        request = lstm_pb2.ResetSessionRequest(session_id=self.id)
        info = _calls.session_info(self._client._call(self._client._stub.ResetSession, request))
        self.seq = info.seq
        return info

    def resync(self) -> int:
        """Takes the server's seq as ours, for example after a SequenceError; returns it."""
        self.seq = self.info().seq
        return self.seq

    def close(self) -> None:
        """Ends the session; closing one that is already closed is not an error."""
        request = lstm_pb2.CloseSessionRequest(session_id=self.id)
        try:
            self._client._call(self._client._stub.CloseSession, request)
        except SessionGone as err:
            if err.reason != "closed":
                raise


_END = object()


class _StepStream:
    """A StreamSteps call driven one request at a time, reopened when the transport fails."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._open()

    def _open(self) -> None:
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        requests = self._requests

        def feed() -> Iterator[lstm_pb2.StepRequest]:
            while (item := requests.get()) is not _END:
                yield item  # type: ignore[misc]

        self._responses: Iterator[lstm_pb2.StepReply] = self._client._stub.StreamSteps(feed())

    def exchange(self, request: lstm_pb2.StepRequest) -> lstm_pb2.StepReply:
        pauses = self._client.retry.backoffs()
        while True:
            self._requests.put(request)
            try:
                return next(self._responses)
            except StopIteration:
                raise ServerError("the server ended the step stream early") from None
            except grpc.RpcError as exc:
                pause = next(pauses, None) if exc.code() in _calls.RETRYABLE_CODES else None
                if pause is None:
                    raise error_from_rpc(exc) from None
                time.sleep(pause)
                self._requests.put(_END)  # ends the old call's request feeder thread
                self._open()

    def close(self) -> None:
        self._requests.put(_END)
        try:
            for _ in self._responses:  # drain so the call ends with OK rather than CANCELLED
                pass
        except grpc.RpcError:
            pass
