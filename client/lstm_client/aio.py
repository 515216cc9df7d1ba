"""asyncio client, the twin of `lstm_client.client`: same methods, awaited; requests and decoding via `_calls`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any, Self, TypeVar

import grpc
import grpc.aio
import numpy.typing as npt

from lstm_client import _calls
from lstm_client._calls import ModelFailure, ModelInfo, Prediction, RetryPolicy, SessionInfo
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client.client import DEFAULT_OPTIONS
from lstm_client.errors import ServerError, SessionGone, error_from_rpc
from lstm_client.tensor import FloatArray

T = TypeVar("T")


class AsyncClient:
    """See `lstm_client.Client`; create it inside a running event loop."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy = RetryPolicy(),
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, int | str]] = DEFAULT_OPTIONS,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
        self._stub = lstm_pb2_grpc.LstmServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _call(self, method: Callable[..., Awaitable[T]], request: object, *, retry: bool = True) -> T:
        pauses = self.retry.backoffs() if retry else iter(())
        while True:
            try:
                return await method(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                pause = next(pauses, None) if exc.code() in _calls.RETRYABLE_CODES else None
                if pause is None:
                    raise error_from_rpc(exc) from None
                await asyncio.sleep(pause)

    async def list_models(self) -> list[ModelInfo]:
        return (await self.list_models_with_failures())[0]

    async def list_models_with_failures(self) -> tuple[list[ModelInfo], list[ModelFailure]]:
        return _calls.model_list(await self._call(self._stub.ListModels, lstm_pb2.ListModelsRequest()))

    async def get_model(self, name: str) -> ModelInfo:
        return _calls.model_info(await self._call(self._stub.GetModel, lstm_pb2.GetModelRequest(name=name)))

    async def create_session(
        self, model: str, *, ttl: float | timedelta | None = None, session_id: str | None = None
    ) -> AsyncSession:
        request = _calls.create_session_request(model, ttl, session_id)
        info = _calls.session_info(await self._call(self._stub.CreateSession, request, retry=False))
        return AsyncSession(self, info)

    async def session(self, session_id: str) -> AsyncSession:
        return AsyncSession(self, await self.session_info(session_id))

    async def session_info(self, session_id: str) -> SessionInfo:
        request = lstm_pb2.GetSessionRequest(session_id=session_id)
        return _calls.session_info(await self._call(self._stub.GetSession, request))

    async def predict(
        self, model: str, xs: npt.ArrayLike, *, h0: npt.ArrayLike | None = None, c0: npt.ArrayLike | None = None
    ) -> Prediction:
        request = _calls.predict_request(model, xs, h0, c0)
        return _calls.prediction(await self._call(self._stub.Predict, request))


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
        outputs = _calls.step_outputs(await self._client._call(self._client._stub.Step, request))
        self.seq += 1
        return outputs

    async def stream(self, xs: Iterable[npt.ArrayLike] | AsyncIterable[npt.ArrayLike]) -> AsyncIterator[FloatArray]:
        stream = _AsyncStepStream(self._client)
        try:
            async for x in _aiter(xs):
                request = _calls.step_request(self.id, self.seq + 1, x)
                outputs = _calls.step_outputs(await stream.exchange(request))
                self.seq += 1
                yield outputs
        finally:
            await stream.close()

    async def info(self) -> SessionInfo:
        return await self._client.session_info(self.id)

    async def reset(self) -> SessionInfo:
        request = lstm_pb2.ResetSessionRequest(session_id=self.id)
        info = _calls.session_info(await self._client._call(self._client._stub.ResetSession, request))
        self.seq = info.seq
        return info

    async def resync(self) -> int:
        self.seq = (await self.info()).seq
        return self.seq

    async def close(self) -> None:
        request = lstm_pb2.CloseSessionRequest(session_id=self.id)
        try:
            await self._client._call(self._client._stub.CloseSession, request)
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
    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._call: Any = client._stub.StreamSteps()

    async def exchange(self, request: lstm_pb2.StepRequest) -> lstm_pb2.StepReply:
        pauses = self._client.retry.backoffs()
        while True:
            try:
                await self._call.write(request)
                reply = await self._call.read()
            except grpc.RpcError as exc:
                pause = next(pauses, None) if exc.code() in _calls.RETRYABLE_CODES else None
                if pause is None:
                    raise error_from_rpc(exc) from None
                await asyncio.sleep(pause)
                self._call = self._client._stub.StreamSteps()
                continue
            if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
                raise ServerError("the server ended the step stream early")
            return reply  # type: ignore[no-any-return]

    async def close(self) -> None:
        try:
            await self._call.done_writing()
            while await self._call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
        except grpc.RpcError:
            pass
