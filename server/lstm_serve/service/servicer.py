"""lstm.v1.LstmService over grpc.aio: a thin layer of proto decoding and encoding around the DataPlane."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_serve.dataplane import DataPlane
from lstm_serve.errors import LstmServeError
from lstm_serve.service import codec
from lstm_serve.service.status import INTERNAL_MESSAGE, error_detail, error_metadata, status_code

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[["LstmServicer", Req, Context], Awaitable[Resp]]

STREAM_WINDOW = 256  # requests of one stream in flight (computing or waiting to be sent) at most


def _unary(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Times and counts the call and turns a domain error into its status code plus an `lstm-error-bin` detail."""
    method = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: LstmServicer, request: Req, context: Context) -> Resp:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await handler(self, request, context)
        except LstmServeError as exc:
            code = status_code(exc)
            context.set_trailing_metadata(error_metadata(error_detail(code, exc.message, exc)))
            await context.abort(code, exc.message)
            raise  # abort() raises; this line only satisfies the type checker
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("%s failed", method)
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, INTERNAL_MESSAGE)
            raise
        finally:
            self._record(method, code, start)

    return wrapper


class LstmServicer(lstm_pb2_grpc.LstmServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.metrics = plane.metrics

    def _record(self, method: str, code: grpc.StatusCode, start: float) -> None:
        self.metrics.rpc_finished(method, code.name, time.perf_counter() - start)

    @_unary
    async def ListModels(self, request: lstm_pb2.ListModelsRequest, context: Context) -> lstm_pb2.ListModelsResponse:
        failures = [lstm_pb2.ModelLoadFailure(name=n, error=e) for n, e in self.plane.repository.failures.items()]
        return lstm_pb2.ListModelsResponse(models=[codec.model_info(m) for m in self.plane.models()], failures=failures)

    @_unary
    async def GetModel(self, request: lstm_pb2.GetModelRequest, context: Context) -> lstm_pb2.ModelInfo:
        return codec.model_info(self.plane.model(request.name).info)

    @_unary
    async def CreateSession(self, request: lstm_pb2.CreateSessionRequest, context: Context) -> lstm_pb2.SessionInfo:
        ttl = codec.seconds(request.idle_ttl) if request.HasField("idle_ttl") else None
        session = self.plane.create_session(request.model, request.session_id or None, ttl)
        return codec.session_info(session)

    @_unary
    async def GetSession(self, request: lstm_pb2.GetSessionRequest, context: Context) -> lstm_pb2.SessionInfo:
        return codec.session_info(self.plane.get_session(request.session_id))

    @_unary
    async def ResetSession(self, request: lstm_pb2.ResetSessionRequest, context: Context) -> lstm_pb2.SessionInfo:
        return codec.session_info(await self.plane.reset_session(request.session_id))

    @_unary
    async def CloseSession(
        self, request: lstm_pb2.CloseSessionRequest, context: Context
    ) -> lstm_pb2.CloseSessionResponse:
        session = await self.plane.close_session(request.session_id)
        return lstm_pb2.CloseSessionResponse(session=codec.session_info(session))

    @_unary
    async def Step(self, request: lstm_pb2.StepRequest, context: Context) -> lstm_pb2.StepResponse:
        x = codec.decode_tensor(request.inputs, "inputs")
        outcome = await self.plane.step(request.session_id, request.seq, x)
        return lstm_pb2.StepResponse(
            session_id=outcome.session_id, seq=outcome.seq, outputs=codec.to_tensor(outcome.outputs)
        )

    @_unary
    async def Predict(self, request: lstm_pb2.PredictRequest, context: Context) -> lstm_pb2.PredictResponse:
        x = codec.decode_tensor(request.inputs, "inputs")
        h0 = codec.decode_tensor(request.h0, "h0") if request.HasField("h0") else None
        c0 = codec.decode_tensor(request.c0, "c0") if request.HasField("c0") else None
        ys, h, c = await self.plane.predict(request.model, x, h0, c0)
        return lstm_pb2.PredictResponse(outputs=codec.to_tensor(ys), h=codec.to_tensor(h), c=codec.to_tensor(c))

    async def StreamSteps(
        self, request_iterator: AsyncIterator[lstm_pb2.StepRequest], context: Context
    ) -> AsyncIterator[lstm_pb2.StepReply]:
        """Answers each request in turn while they are for models computed on the event loop: a plain read-compute-
        reply loop in this one task, as cheap as gRPC allows. At the first request for a model computed in threads,
        the rest of the stream is handed to a reader task that handles requests concurrently (so the sessions of one
        stream batch together) and replies as they finish. One session's requests keep their order either way (the
        data plane's per-session lock)."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            requests = aiter(request_iterator)
            async for request in requests:
                if self.plane.computes_inline(request.session_id):
                    yield await self._stream_step(request)
                    continue
                async for reply in self._concurrent_stream(request, requests):
                    yield reply
                break
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("StreamSteps failed")
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, INTERNAL_MESSAGE)
        finally:
            self._record("StreamSteps", code, start)

    async def _concurrent_stream(
        self, first: lstm_pb2.StepRequest, requests: AsyncIterator[lstm_pb2.StepRequest]
    ) -> AsyncIterator[lstm_pb2.StepReply]:
        replies: asyncio.Queue[lstm_pb2.StepReply | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)

        async def answer(request: lstm_pb2.StepRequest) -> None:
            replies.put_nowait(await self._stream_step(request))

        async def read() -> None:
            async with asyncio.TaskGroup() as tasks:
                await window.acquire()
                tasks.create_task(answer(first))
                async for request in requests:
                    await window.acquire()
                    if self.plane.computes_inline(request.session_id):
                        await answer(request)  # no task needed; this session's order is kept by construction
                    else:
                        tasks.create_task(answer(request))

        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _: replies.put_nowait(None))
        try:
            while (reply := await replies.get()) is not None:
                window.release()
                yield reply
            await reader  # re-raises a failure of the request side
        finally:
            reader.cancel()

    async def _stream_step(self, request: lstm_pb2.StepRequest) -> lstm_pb2.StepReply:
        reply = lstm_pb2.StepReply(session_id=request.session_id, seq=request.seq)
        code = grpc.StatusCode.OK
        try:
            x = codec.decode_tensor(request.inputs, "inputs")
            outcome = await self.plane.step(request.session_id, request.seq, x)
            reply.outputs.CopyFrom(codec.to_tensor(outcome.outputs))
        except LstmServeError as exc:
            code = status_code(exc)
            reply.error.CopyFrom(error_detail(code, exc.message, exc))
        except Exception:
            log.exception("StreamSteps request for session %s seq %d failed", request.session_id, request.seq)
            code = grpc.StatusCode.INTERNAL
            reply.error.CopyFrom(error_detail(code, INTERNAL_MESSAGE))
        self.metrics.stream_requests.labels(code=code.name).inc()
        return reply
