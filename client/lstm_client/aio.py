"""asyncio client, the twin of `lstm_client.client`: same methods, awaited; requests and decoding via `_calls`,
retries via `_retry`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Self, TypeVar

import grpc
import grpc.aio
import numpy.typing as npt

from lstm_client import _calls, _retry
from lstm_client._calls import Forecast, Gates, ManyResult, ModelFailure, ModelInfo, Prediction, ServerInfo, SessionInfo
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client._retry import RetryPolicy, StreamBroken
from lstm_client.client import DEFAULT_OPTIONS
from lstm_client.errors import SessionGone, error_from_detail
from lstm_client.tensor import FloatArray
from lstm_client.tls import TlsConfig, auth_metadata, channel_security

T = TypeVar("T")


class AsyncClient:
    """See `lstm_client.Client` (the same options: timeout, retry, tls, token, credentials, ...); create it inside a
    running event loop."""

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
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self._on_retry: _retry.OnRetry | None = None  # told of every retry (the load generator counts them)
        self._auth = auth_metadata(token)
        secure, extra = channel_security(tls, credentials)
        if secure is None:
            self._channel = grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        else:
            self._channel = grpc.aio.secure_channel(
                target, secure, options=[*options, *extra], interceptors=interceptors
            )
        self._stub = lstm_pb2_grpc.LstmServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    # The internal API of sessions, streams and the load generator; the same as `Client`'s, awaited.

    def _metadata(self, session_id: str | None) -> tuple[tuple[str, str], ...] | None:
        return _retry.call_metadata(session_id, self._auth)

    async def _run(self, attempt: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        schedule = self.retry.schedule() if retry else None
        return await _retry.run_async(attempt, schedule, on_retry=self._on_retry)

    async def _invoke(self, method: str, request: object, *, affinity: str | None = None, retry: bool = True) -> Any:
        rpc = getattr(self._stub, method)
        metadata = self._metadata(affinity)
        return await self._run(lambda: rpc(request, timeout=self.timeout, metadata=metadata), retry=retry)

    def _open_stream(self, *, affinity: str | None, bind: bool = False) -> Any:
        """A new StreamSteps call, written to and read from by the caller; see `Client._open_stream`."""
        return self._stub.StreamSteps(metadata=_calls.stream_metadata(self._metadata(affinity), bind))

    async def list_models(self) -> list[ModelInfo]:
        return (await self.list_models_with_failures())[0]

    async def list_models_with_failures(self) -> tuple[list[ModelInfo], list[ModelFailure]]:
        return _calls.model_list(await self._invoke("ListModels", lstm_pb2.ListModelsRequest()))

    async def get_model(self, name: str, version: int = 0) -> ModelInfo:
        return _calls.model_info(await self._invoke("GetModel", lstm_pb2.GetModelRequest(name=name, version=version)))

    async def server_info(self) -> ServerInfo:
        """The server's versions and limits (a server before 0.2 answers UNIMPLEMENTED: ServerError)."""
        return _calls.server_info(await self._invoke("GetServerInfo", lstm_pb2.GetServerInfoRequest()))

    async def create_session(
        self,
        model: str,
        *,
        ttl: float | timedelta | None = None,
        session_id: str | None = None,
        model_version: int = 0,
        h0: npt.ArrayLike | None = None,
        c0: npt.ArrayLike | None = None,
    ) -> AsyncSession:
        """See `Client.create_session`: retried only with a client-chosen `session_id`."""
        request = _calls.create_session_request(model, ttl, session_id, model_version, h0, c0)
        return AsyncSession(self, await self._create("CreateSession", request, session_id, model))

    async def _create(self, method: str, request: object, session_id: str | None, model: str | None) -> SessionInfo:
        """See `Client._create`."""
        if session_id is None:
            return _calls.session_info(await self._invoke(method, request, retry=False))
        rpc = getattr(self._stub, method)
        metadata = self._metadata(session_id)
        failed_before = False

        async def attempt() -> Any:
            nonlocal failed_before
            try:
                return await rpc(request, timeout=self.timeout, metadata=metadata)
            except grpc.RpcError as exc:
                if not (failed_before and exc.code() == grpc.StatusCode.ALREADY_EXISTS):
                    failed_before = True
                    raise
                taken = exc
            found = await self._stub.GetSession(
                lstm_pb2.GetSessionRequest(session_id=session_id), timeout=self.timeout, metadata=metadata
            )
            if not _calls.is_fresh_session(found, model):
                raise taken
            return found

        return _calls.session_info(await self._run(attempt))

    async def forecast(
        self,
        inputs: npt.ArrayLike,
        *,
        session_id: str | None = None,
        model: str | None = None,
        h0: npt.ArrayLike | None = None,
        c0: npt.ArrayLike | None = None,
    ) -> Forecast:
        """See `Client.forecast`."""
        request = _calls.forecast_request(inputs, session_id=session_id, model=model, h0=h0, c0=c0)
        return _calls.forecast(await self._invoke("Forecast", request, affinity=session_id))

    async def fork_session(
        self, session_id: str, *, new_session_id: str | None = None, ttl: float | timedelta | None = None
    ) -> AsyncSession:
        request = _calls.fork_request(session_id, new_session_id, ttl)
        return AsyncSession(self, await self._create("ForkSession", request, new_session_id, None))

    async def export_session(self, session_id: str) -> bytes:
        request = lstm_pb2.ExportSessionRequest(session_id=session_id)
        blob: bytes = (await self._invoke("ExportSession", request, affinity=session_id)).blob
        return blob

    async def import_session(
        self, blob: bytes, *, session_id: str | None = None, ttl: float | timedelta | None = None
    ) -> AsyncSession:
        request = _calls.import_request(blob, session_id, ttl)
        return AsyncSession(self, await self._create("ImportSession", request, session_id, None))

    async def session(self, session_id: str) -> AsyncSession:
        return AsyncSession(self, await self.session_info(session_id))

    async def session_info(self, session_id: str) -> SessionInfo:
        request = lstm_pb2.GetSessionRequest(session_id=session_id)
        return _calls.session_info(await self._invoke("GetSession", request, affinity=session_id))

    async def step_many(self, steps: Mapping[AsyncSession, npt.ArrayLike]) -> ManyResult[AsyncSession]:
        """See `Client.step_many`."""
        sessions = list(steps)
        response = await self._invoke("StepMany", _calls.step_many_request(steps))
        return _calls.many_result(sessions, response.replies)

    async def predict(
        self, model: str, xs: npt.ArrayLike, *, h0: npt.ArrayLike | None = None, c0: npt.ArrayLike | None = None
    ) -> Prediction:
        request = _calls.predict_request(model, xs, h0, c0)
        return _calls.prediction(await self._invoke("Predict", request))


class AsyncSession:
    """See `lstm_client.Session`; use it from one task at a time."""

    def __init__(self, client: AsyncClient, info: SessionInfo) -> None:
        self._client = client
        self.id = info.session_id
        self.model = info.model
        self.seq = info.seq

    def __repr__(self) -> str:
        return f"AsyncSession(id={self.id!r}, model={self.model!r}, seq={self.seq})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def step(self, x: npt.ArrayLike) -> FloatArray:
        request = _calls.step_request(self.id, self.seq + 1, x)
        outputs = _calls.step_outputs(await self._client._invoke("Step", request, affinity=self.id))
        self.seq += 1
        return outputs

    async def stream(
        self, xs: Iterable[npt.ArrayLike] | AsyncIterable[npt.ArrayLike], *, bind: bool = False
    ) -> AsyncIterator[FloatArray]:
        """See `Session.stream`."""
        stream = _AsyncStepStream(self._client, self.id, bind=bind)
        try:
            async for x in _aiter(xs):
                outputs = await stream.exchange(_calls.step_request(self.id, self.seq + 1, x))
                self.seq += 1
                yield outputs
        finally:
            await stream.close()

    async def info(self) -> SessionInfo:
        return await self._client.session_info(self.id)

    async def step_with_gates(self, x: npt.ArrayLike) -> tuple[FloatArray, Gates | None]:
        request = _calls.gated_step_request(self.id, self.seq + 1, x)
        reply = await self._client._invoke("Step", request, affinity=self.id)
        outputs = _calls.step_outputs(reply)
        self.seq += 1
        return outputs, _calls.step_gates(reply)

    async def forecast(self, inputs: npt.ArrayLike) -> Forecast:
        return await self._client.forecast(inputs, session_id=self.id)

    async def fork(self, *, new_session_id: str | None = None, ttl: float | timedelta | None = None) -> AsyncSession:
        return await self._client.fork_session(self.id, new_session_id=new_session_id, ttl=ttl)

    async def export_state(self) -> bytes:
        return await self._client.export_session(self.id)

    async def reset(self) -> SessionInfo:
        request = lstm_pb2.ResetSessionRequest(session_id=self.id)
        info = _calls.session_info(await self._client._invoke("ResetSession", request, affinity=self.id))
        self.seq = info.seq
        return info

    async def resync(self) -> int:
        self.seq = (await self.info()).seq
        return self.seq

    async def close(self) -> None:
        request = lstm_pb2.CloseSessionRequest(session_id=self.id)
        try:
            await self._client._invoke("CloseSession", request, affinity=self.id)
        except SessionGone as err:
            if err.reason != "closed":
                raise


async def _aiter(xs: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(xs, AsyncIterable):
        async for x in xs:
            yield x
    else:
        for x in xs:
            yield x


class _AsyncStepStream:
    """See `lstm_client.client._StepStream`: the same bookkeeping over a grpc.aio call."""

    def __init__(self, client: AsyncClient, session_id: str, *, bind: bool = False) -> None:
        self._client = client
        self._session_id = session_id
        self._bind = bind
        self._unacked: dict[int, lstm_pb2.StepRequest] = {}  # by seq, in sending order
        self._unsent: list[lstm_pb2.StepRequest] = []  # accepted, not yet written on the current call
        self._call: Any = None

    def _open(self) -> None:
        self._call = self._client._open_stream(affinity=self._session_id, bind=self._bind)
        self._unsent = list(self._unacked.values())

    def _drop(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._call = None

    async def exchange(self, request: lstm_pb2.StepRequest) -> FloatArray:
        self._unacked[request.seq] = request
        self._unsent.append(request)
        return await self._client._run(self._attempt)

    async def _attempt(self) -> FloatArray:
        if self._call is None:
            self._open()
        try:
            while self._unsent:
                await _retry.write(self._call, self._unsent[0])
                self._unsent.pop(0)
            reply = await _retry.read(self._call, self._client.timeout)
        except (grpc.RpcError, StreamBroken):
            self._drop()
            raise
        if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
            self._drop()
            raise StreamBroken("the server ended the step stream early")
        if reply.WhichOneof("result") == "error":
            err = error_from_detail(reply.error)
            if _retry.retryable(err):  # not applied (or applied and stored): resend on a new call
                self._drop()
                raise err
        self._unacked.pop(reply.seq, None)
        return _calls.step_outputs(reply)

    async def close(self) -> None:
        if self._call is None:
            return
        try:
            await self._call.done_writing()
            while await self._call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # broken at the very end: every reply has been received
        self._call = None
