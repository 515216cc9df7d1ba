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
REQUEST_ID_KEY = "x-request-id"


def _request_id(context: Context) -> str | None:
    """The caller's request id from the call metadata, for correlating our logs with theirs."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return str(value)[:128]
    return None


def _log_outcome(
    method: str, request: object, request_id: str | None, code: grpc.StatusCode, message: str, seconds: float
) -> None:
    """One line per finished call: DEBUG when OK, INFO for a refused request (INTERNAL is logged with its traceback
    where it is caught). Costs nothing on the fast path when the level is off."""
    level = logging.DEBUG if code == grpc.StatusCode.OK else logging.INFO
    if code == grpc.StatusCode.INTERNAL or not log.isEnabledFor(level):
        return
    fields = {
        "method": method,
        "code": code.name,
        "session_id": getattr(request, "session_id", None) or None,
        "seq": getattr(request, "seq", None),
        "request_id": request_id,
        "duration_ms": round(seconds * 1e3, 3),
    }
    log.log(level, "%s %s%s", method, code.name, f": {message}" if message else "", extra=fields)


def _unary(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Times and counts the call and turns a domain error into its status code plus an `lstm-error-bin` detail."""
    method = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: LstmServicer, request: Req, context: Context) -> Resp:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        message = ""
        try:
            return await handler(self, request, context)
        except LstmServeError as exc:
            code, message = status_code(exc), exc.message
            context.set_trailing_metadata(error_metadata(error_detail(code, exc.message, exc)))
            await context.abort(code, exc.message)
            raise  # abort() raises; this line only satisfies the type checker
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            fields = {
                "method": method,
                "session_id": getattr(request, "session_id", None),
                "request_id": _request_id(context),
            }
            log.exception("%s failed", method, extra=fields)
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, INTERNAL_MESSAGE)
            raise
        finally:
            elapsed = self._record(method, code, start)
            request_id = _request_id(context) if code != grpc.StatusCode.OK else None  # read only when logged
            _log_outcome(method, request, request_id, code, message, elapsed)

    return wrapper


class LstmServicer(lstm_pb2_grpc.LstmServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.metrics = plane.metrics

    def _record(self, method: str, code: grpc.StatusCode, start: float) -> float:
        elapsed = time.perf_counter() - start
        self.metrics.rpc_finished(method, code.name, elapsed)
        return elapsed

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
        session = await self.plane.create_session(request.model, request.session_id or None, ttl)
        return codec.session_info(session)

    @_unary
    async def GetSession(self, request: lstm_pb2.GetSessionRequest, context: Context) -> lstm_pb2.SessionInfo:
        return codec.session_info(await self.plane.get_session(request.session_id))

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
        """Requests are handled concurrently, so that the sessions sharing a stream batch together, and answered as
        they finish; one session's requests keep their order through the data plane's per-session lock. (Handling
        them in turn saves a task per request but loses the batching within a stream: measured slower, see
        docs/performance.md.)"""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        request_id = _request_id(context)
        replies: asyncio.Queue[lstm_pb2.StepReply | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)

        async def answer(request: lstm_pb2.StepRequest) -> None:
            replies.put_nowait(await self._stream_step(request, request_id))

        async def read() -> None:
            async with asyncio.TaskGroup() as tasks:
                async for request in request_iterator:
                    await window.acquire()
                    tasks.create_task(answer(request))

        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _: replies.put_nowait(None))
        try:
            while (reply := await replies.get()) is not None:
                window.release()
                yield reply
            await reader  # re-raises a failure of the request side
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("StreamSteps failed", extra={"request_id": request_id})
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, INTERNAL_MESSAGE)
        finally:
            reader.cancel()
            elapsed = self._record("StreamSteps", code, start)
            _log_outcome("StreamSteps", None, request_id, code, "", elapsed)

    async def _stream_step(self, request: lstm_pb2.StepRequest, request_id: str | None) -> lstm_pb2.StepReply:
        reply = lstm_pb2.StepReply(session_id=request.session_id, seq=request.seq)
        code = grpc.StatusCode.OK
        try:
            x = codec.decode_tensor(request.inputs, "inputs")
            outcome = await self.plane.step(request.session_id, request.seq, x)
            reply.outputs.CopyFrom(codec.to_tensor(outcome.outputs))
        except LstmServeError as exc:
            code = status_code(exc)
            reply.error.CopyFrom(error_detail(code, exc.message, exc))
            _log_outcome("StreamSteps.request", request, request_id, code, exc.message, 0.0)
        except Exception:
            extra = {"session_id": request.session_id, "seq": request.seq, "request_id": request_id}
            log.exception("StreamSteps request failed", extra=extra)
            code = grpc.StatusCode.INTERNAL
            reply.error.CopyFrom(error_detail(code, INTERNAL_MESSAGE))
        self.metrics.stream_request(code.name)
        return reply
