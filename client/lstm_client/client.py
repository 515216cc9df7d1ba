"""Blocking client. `AsyncClient` in lstm_client.aio is its twin; both build and decode through `_calls` and retry
through `_retry`."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import numpy.typing as npt

from lstm_client import _calls, _retry
from lstm_client._calls import Forecast, Gates, ManyResult, ModelFailure, ModelInfo, Prediction, ServerInfo, SessionInfo
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client._retry import RetryPolicy, StreamBroken
from lstm_client.errors import SessionGone, error_from_detail
from lstm_client.tensor import FloatArray
from lstm_client.tls import TlsConfig, auth_metadata, channel_security

T = TypeVar("T")

DEFAULT_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # gRPC's own reconnect backoff starts at 1 s and grows to 2 min; a restarted server should be found again within
    # the retry budget, so try again from 0.1 s and at least once a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class Client:
    """A connection to an lstm-serve server.

    `timeout` is the deadline of each attempt, in seconds. Calls failing with UNAVAILABLE or DEADLINE_EXCEEDED, and
    step streams that break, are retried under `retry` (by default for up to 10 s, enough to outlast a replica
    restart or a failover); that is safe for steps because each is resent with its original seq and the server
    never applies one twice. `interceptors` (tracing, ...) wrap every call.

    Security: `tls=True` connects over TLS trusting the system's roots, `tls=TlsConfig(ca=..., cert=..., key=...)`
    with a private CA and, for mutual TLS, a client certificate (or pass ready `credentials`). `token` is sent as
    `authorization: Bearer <token>` on every call, for a server run with --tokens-file.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy = RetryPolicy(),
        tls: bool | TlsConfig = False,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, int | str]] = DEFAULT_OPTIONS,
        interceptors: Sequence[
            grpc.UnaryUnaryClientInterceptor[Any, Any] | grpc.StreamStreamClientInterceptor[Any, Any]
        ] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self._on_retry: _retry.OnRetry | None = None  # told of every retry (the load generator counts them)
        self._auth = auth_metadata(token)
        secure, extra = channel_security(tls, credentials)
        if secure is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, secure, options=[*options, *extra])
        channel = grpc.intercept_channel(self._channel, *interceptors) if interceptors else self._channel
        self._stub = lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # The internal API of sessions and streams: they name the RPC and the session; the stub stays in here.

    def _metadata(self, session_id: str | None) -> tuple[tuple[str, str], ...] | None:
        """Every call's metadata: its session (affinity) and the bearer token."""
        return _retry.call_metadata(session_id, self._auth)

    def _run(self, attempt: Callable[[], T], *, retry: bool = True) -> T:
        """`attempt` under this client's retry policy; failures end as LstmError."""
        schedule = self.retry.schedule() if retry else None
        return _retry.run(attempt, schedule, on_retry=self._on_retry)

    def _invoke(self, method: str, request: object, *, affinity: str | None = None, retry: bool = True) -> Any:
        """A unary call by RPC name; `affinity` is the session it is about (sent as the x-session-id header)."""
        rpc = getattr(self._stub, method)
        metadata = self._metadata(affinity)
        return self._run(lambda: rpc(request, timeout=self.timeout, metadata=metadata), retry=retry)

    def _open_stream(self, requests: Iterator[lstm_pb2.StepRequest], *, affinity: str, bind: bool = False) -> Any:
        """A new StreamSteps call fed from `requests`; its replies are iterated. `bind`: the sessions it steps are
        closed with it."""
        return self._stub.StreamSteps(requests, metadata=_calls.stream_metadata(self._metadata(affinity), bind))

    def list_models(self) -> list[ModelInfo]:
        return self.list_models_with_failures()[0]

    def list_models_with_failures(self) -> tuple[list[ModelInfo], list[ModelFailure]]:
        return _calls.model_list(self._invoke("ListModels", lstm_pb2.ListModelsRequest()))

    def get_model(self, name: str, version: int = 0) -> ModelInfo:
        return _calls.model_info(self._invoke("GetModel", lstm_pb2.GetModelRequest(name=name, version=version)))

    def server_info(self) -> ServerInfo:
        """The server's versions and limits (a server before 0.2 answers UNIMPLEMENTED: ServerError)."""
        return _calls.server_info(self._invoke("GetServerInfo", lstm_pb2.GetServerInfoRequest()))

    def create_session(
        self,
        model: str,
        *,
        ttl: float | timedelta | None = None,
        session_id: str | None = None,
        model_version: int = 0,
        h0: npt.ArrayLike | None = None,
        c0: npt.ArrayLike | None = None,
    ) -> Session:
        """A new session; `ttl=0` never expires by idleness; `h0` / `c0` ([num_layers, hidden_size]) its initial
        state, zeros by default.

        With a `session_id` of your choosing the call is retried like any other: should a lost reply have created
        it already, the retry's ALREADY_EXISTS is taken as success when the session there is untouched (seq 0) and of
        this model. Without one it is tried once: the server picks the id, so a retry after a lost reply would leave
        a second, orphaned session behind.
        """
        request = _calls.create_session_request(model, ttl, session_id, model_version, h0, c0)
        return Session(self, self._create("CreateSession", request, session_id, model))

    def _create(self, method: str, request: object, session_id: str | None, model: str | None) -> SessionInfo:
        """A call that creates a session (CreateSession, ForkSession, ImportSession), retried only with a
        client-chosen id (see `create_session`)."""
        if session_id is None:
            return _calls.session_info(self._invoke(method, request, retry=False))
        rpc = getattr(self._stub, method)
        metadata = self._metadata(session_id)
        failed_before = False

        def attempt() -> Any:
            nonlocal failed_before
            try:
                return rpc(request, timeout=self.timeout, metadata=metadata)
            except grpc.RpcError as exc:
                if not (failed_before and exc.code() == grpc.StatusCode.ALREADY_EXISTS):
                    failed_before = True
                    raise
                taken = exc
            found = self._stub.GetSession(
                lstm_pb2.GetSessionRequest(session_id=session_id), timeout=self.timeout, metadata=metadata
            )
            if not _calls.is_fresh_session(found, model):
                raise taken
            return found

        return _calls.session_info(self._run(attempt))

    def forecast(
        self,
        inputs: npt.ArrayLike,
        *,
        session_id: str | None = None,
        model: str | None = None,
        h0: npt.ArrayLike | None = None,
        c0: npt.ArrayLike | None = None,
    ) -> Forecast:
        """Rolls forward len(inputs) steps from a session's state, or a model's (h0, c0, zeros by default), without
        committing anything. Row 0 of `inputs` is complete; in later rows the fed-back features may be NaN."""
        request = _calls.forecast_request(inputs, session_id=session_id, model=model, h0=h0, c0=c0)
        return _calls.forecast(self._invoke("Forecast", request, affinity=session_id))

    def fork_session(
        self, session_id: str, *, new_session_id: str | None = None, ttl: float | timedelta | None = None
    ) -> Session:
        """A new session from `session_id`'s current state (seq 0); retried like `create_session`."""
        request = _calls.fork_request(session_id, new_session_id, ttl)
        return Session(self, self._create("ForkSession", request, new_session_id, None))

    def export_session(self, session_id: str) -> bytes:
        """The session's state as a blob for `import_session` on any server serving the same model."""
        request = lstm_pb2.ExportSessionRequest(session_id=session_id)
        blob: bytes = self._invoke("ExportSession", request, affinity=session_id).blob
        return blob

    def import_session(
        self, blob: bytes, *, session_id: str | None = None, ttl: float | timedelta | None = None
    ) -> Session:
        """A new session (seq 0) from an exported blob; retried like `create_session`."""
        return Session(
            self, self._create("ImportSession", _calls.import_request(blob, session_id, ttl), session_id, None)
        )

    def session(self, session_id: str) -> Session:
        """Attaches to an existing session (for example after a client restart), continuing from its seq."""
        return Session(self, self.session_info(session_id))

    def session_info(self, session_id: str) -> SessionInfo:
        request = lstm_pb2.GetSessionRequest(session_id=session_id)
        return _calls.session_info(self._invoke("GetSession", request, affinity=session_id))

    def step_many(self, steps: Mapping[Session, npt.ArrayLike]) -> ManyResult[Session]:
        """One step for each of many sessions in one call, e.g. {session: x, ...}: each applied exactly once, each
        answered on its own. Retried as a whole like any step (every step keeps its seq, so none is applied twice);
        a step refused (a SequenceError, a session gone...) is in `errors`, and its session's seq stays."""
        sessions = list(steps)
        response = self._invoke("StepMany", _calls.step_many_request(steps))
        return _calls.many_result(sessions, response.replies)

    def predict(
        self, model: str, xs: npt.ArrayLike, *, h0: npt.ArrayLike | None = None, c0: npt.ArrayLike | None = None
    ) -> Prediction:
        """Stateless: runs the whole sequence `xs` [T, input_size] from (h0, c0), zeros by default."""
        return _calls.prediction(self._invoke("Predict", _calls.predict_request(model, xs, h0, c0)))


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
        outputs = _calls.step_outputs(self._client._invoke("Step", request, affinity=self.id))
        self.seq += 1
        return outputs

    def stream(self, xs: Iterable[npt.ArrayLike], *, bind: bool = False) -> Iterator[FloatArray]:
        """Steps through `xs` over one bidirectional stream, yielding each prediction as it arrives.

        A broken stream is reopened and the unanswered step resent with its seq, so nothing is applied twice.
        `bind=True`: the server closes the session when this stream ends (when `xs` is exhausted or the iteration is
        closed; if the connection breaks for good, after the server's --bound-session-grace).
        """
        stream = _StepStream(self._client, self.id, bind=bind)
        try:
            for x in xs:
                outputs = stream.exchange(_calls.step_request(self.id, self.seq + 1, x))
                self.seq += 1
                yield outputs
        finally:
            stream.close()

    def info(self) -> SessionInfo:
        return self._client.session_info(self.id)

    def step_with_gates(self, x: npt.ArrayLike) -> tuple[FloatArray, Gates | None]:
        """`step`, also returning the cell's internals (None when the server answered a retry from its stored reply)."""
        request = _calls.gated_step_request(self.id, self.seq + 1, x)
        reply = self._client._invoke("Step", request, affinity=self.id)
        outputs = _calls.step_outputs(reply)
        self.seq += 1
        return outputs, _calls.step_gates(reply)

    def forecast(self, inputs: npt.ArrayLike) -> Forecast:
        """A forecast from this session's current state; the session is not changed."""
        return self._client.forecast(inputs, session_id=self.id)

    def fork(self, *, new_session_id: str | None = None, ttl: float | timedelta | None = None) -> Session:
        return self._client.fork_session(self.id, new_session_id=new_session_id, ttl=ttl)

    def export_state(self) -> bytes:
        return self._client.export_session(self.id)

    def reset(self) -> SessionInfo:
        """Zeroes the state (h, c of every layer); seq goes on counting."""
        request = lstm_pb2.ResetSessionRequest(session_id=self.id)
        info = _calls.session_info(self._client._invoke("ResetSession", request, affinity=self.id))
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
            self._client._invoke("CloseSession", request, affinity=self.id)
        except SessionGone as err:
            if err.reason != "closed":
                raise


_END = object()


class _StepStream:
    """One session's StreamSteps call, driven one request at a time.

    Every request stays in `_unacked` until its reply arrives. When the call breaks (a retryable status, an early
    end, or an in-band UNAVAILABLE), it is dropped, and the next attempt opens a new one and resends every unanswered
    request with its original seq: the server answers an already applied one from its stored reply.
    """

    def __init__(self, client: Client, session_id: str, *, bind: bool = False) -> None:
        self._client = client
        self._session_id = session_id
        self._bind = bind
        self._unacked: dict[int, lstm_pb2.StepRequest] = {}  # by seq, in sending order
        self._unsent: list[lstm_pb2.StepRequest] = []  # accepted, not yet written on the current call
        self._requests: queue.SimpleQueue[object] | None = None
        self._responses: Any = None  # the call; iterating it gives the replies
        self._watchdog = _retry.ReplyWatchdog(client.timeout)  # a reply overdue by `timeout` breaks the stream

    def _open(self) -> None:
        requests: queue.SimpleQueue[object] = queue.SimpleQueue()

        def feed() -> Iterator[lstm_pb2.StepRequest]:
            while (item := requests.get()) is not _END:
                yield item  # type: ignore[misc]

        self._requests = requests
        self._responses = self._client._open_stream(feed(), affinity=self._session_id, bind=self._bind)
        self._unsent = list(self._unacked.values())

    def _drop(self) -> None:
        if self._requests is not None:
            self._requests.put(_END)  # ends the call's request feeder thread
        if self._responses is not None:
            self._responses.cancel()
        self._requests = self._responses = None

    def exchange(self, request: lstm_pb2.StepRequest) -> FloatArray:
        """Sends `request` and returns its outputs; an in-band error is raised as the matching LstmError."""
        self._unacked[request.seq] = request
        self._unsent.append(request)
        return self._client._run(self._attempt)

    def _attempt(self) -> FloatArray:
        if self._responses is None:
            self._open()
        assert self._requests is not None
        while self._unsent:
            self._requests.put(self._unsent.pop(0))
        self._watchdog.arm(self._responses)
        try:
            reply: lstm_pb2.StepReply = next(self._responses)
        except StopIteration:
            self._drop()
            raise StreamBroken("the server ended the step stream early") from None
        except grpc.RpcError:
            self._drop()
            if self._watchdog.fired:
                raise StreamBroken(f"no reply within {self._watchdog.timeout:g} s") from None
            raise
        finally:
            self._watchdog.disarm()
        if reply.WhichOneof("result") == "error":
            err = error_from_detail(reply.error)
            if _retry.retryable(err):  # not applied (or applied and stored): resend on a new call
                self._drop()
                raise err
        self._unacked.pop(reply.seq, None)
        return _calls.step_outputs(reply)

    def close(self) -> None:
        self._watchdog.close()
        if self._requests is None:
            return
        self._requests.put(_END)
        try:
            for _ in self._responses:  # drain so the call ends with OK rather than CANCELLED
                pass
        except grpc.RpcError:
            pass
        self._requests = self._responses = None
