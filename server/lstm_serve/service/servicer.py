"""lstm.v1.LstmService over grpc.aio: a thin layer of proto decoding and encoding around the DataPlane.

Each method here is the protocol mapping only; admission, parsing, timing, metrics, logging and error mapping are
shared by every method in service/calls.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from lstm_client._proto.lstm.v1 import lstm_pb2
from lstm_serve.dataplane import DataPlane
from lstm_serve.errors import InvalidInput, LstmServeError, ShuttingDown
from lstm_serve.service import codec
from lstm_serve.service.calls import TENANT, Calls, Context, parse, peer_host, request_id
from lstm_serve.service.status import INTERNAL_MESSAGE, error_detail, error_metadata, status_code

log = logging.getLogger(__name__)

SERVICE = "lstm.v1.LstmService"
STREAM_WINDOW = 256  # requests of one stream in flight (computing or waiting to be sent) at most


class LstmServicer:
    def __init__(self, plane: DataPlane, calls: Calls) -> None:
        self.plane = plane
        self.calls = calls
        self.metrics = plane.metrics

    def register(self, server: grpc.aio.Server) -> None:
        """Adds every method, taking raw request bytes (parsed in calls.py, where a malformed message becomes
        INVALID_ARGUMENT)."""
        unary: dict[str, tuple[type[Any], Callable[[Any, Context], Awaitable[Any]]]] = {
            "ListModels": (lstm_pb2.ListModelsRequest, self.ListModels),
            "GetModel": (lstm_pb2.GetModelRequest, self.GetModel),
            "CreateSession": (lstm_pb2.CreateSessionRequest, self.CreateSession),
            "GetSession": (lstm_pb2.GetSessionRequest, self.GetSession),
            "ResetSession": (lstm_pb2.ResetSessionRequest, self.ResetSession),
            "CloseSession": (lstm_pb2.CloseSessionRequest, self.CloseSession),
            "Step": (lstm_pb2.StepRequest, self.Step),
            "Predict": (lstm_pb2.PredictRequest, self.Predict),
            # issue 13
            "Forecast": (lstm_pb2.ForecastRequest, self.Forecast),
            "ForkSession": (lstm_pb2.ForkSessionRequest, self.ForkSession),
            "ExportSession": (lstm_pb2.ExportSessionRequest, self.ExportSession),
            "ImportSession": (lstm_pb2.ImportSessionRequest, self.ImportSession),
        }
        serialize = lstm_pb2.StepReply.SerializeToString
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self.calls.unary(name, message_type, handler), response_serializer=_serialize
            )
            for name, (message_type, handler) in unary.items()
        }
        handlers["StreamSteps"] = grpc.stream_stream_rpc_method_handler(self.StreamSteps, response_serializer=serialize)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    async def ListModels(self, request: lstm_pb2.ListModelsRequest, context: Context) -> lstm_pb2.ListModelsResponse:
        failures = [lstm_pb2.ModelLoadFailure(name=n, error=e) for n, e in self.plane.model_failures().items()]
        return lstm_pb2.ListModelsResponse(models=[codec.model_info(m) for m in self.plane.models()], failures=failures)

    async def GetModel(self, request: lstm_pb2.GetModelRequest, context: Context) -> lstm_pb2.ModelInfo:
        return codec.model_info(self.plane.model(request.name).info)

    async def CreateSession(self, request: lstm_pb2.CreateSessionRequest, context: Context) -> lstm_pb2.SessionInfo:
        ttl = codec.seconds(request.idle_ttl) if request.HasField("idle_ttl") else None
        h0 = codec.decode_tensor(request.h0, "h0") if request.HasField("h0") else None
        c0 = codec.decode_tensor(request.c0, "c0") if request.HasField("c0") else None
        session = await self.plane.create_session(
            request.model, request.session_id or None, ttl, tenant=TENANT.get(), h0=h0, c0=c0
        )
        return codec.session_info(session)

    async def GetSession(self, request: lstm_pb2.GetSessionRequest, context: Context) -> lstm_pb2.SessionInfo:
        return codec.session_info(await self.plane.get_session(request.session_id, tenant=TENANT.get()))

    async def ResetSession(self, request: lstm_pb2.ResetSessionRequest, context: Context) -> lstm_pb2.SessionInfo:
        return codec.session_info(await self.plane.reset_session(request.session_id, tenant=TENANT.get()))

    async def CloseSession(
        self, request: lstm_pb2.CloseSessionRequest, context: Context
    ) -> lstm_pb2.CloseSessionResponse:
        session = await self.plane.close_session(request.session_id, tenant=TENANT.get())
        return lstm_pb2.CloseSessionResponse(session=codec.session_info(session))

    async def Step(self, request: lstm_pb2.StepRequest, context: Context) -> lstm_pb2.StepResponse:
        if request.with_gates:
            return await self._step_with_gates(request)
        x = codec.decode_tensor(request.inputs, "inputs")
        outcome = await self.plane.step(request.session_id, request.seq, x, tenant=TENANT.get())
        return lstm_pb2.StepResponse(
            session_id=outcome.session_id, seq=outcome.seq, outputs=codec.to_tensor(outcome.outputs)
        )

    async def Predict(self, request: lstm_pb2.PredictRequest, context: Context) -> lstm_pb2.PredictResponse:
        x = codec.decode_tensor(request.inputs, "inputs")
        h0 = codec.decode_tensor(request.h0, "h0") if request.HasField("h0") else None
        c0 = codec.decode_tensor(request.c0, "c0") if request.HasField("c0") else None
        ys, h, c = await self.plane.predict(request.model, x, h0, c0)
        return lstm_pb2.PredictResponse(outputs=codec.to_tensor(ys), h=codec.to_tensor(h), c=codec.to_tensor(c))

    # --- issue 13 -------------------------------------------------------------------------------------------------

    async def _step_with_gates(self, request: lstm_pb2.StepRequest) -> lstm_pb2.StepResponse:
        x = codec.decode_tensor(request.inputs, "inputs")
        outcome = await self.plane.step_with_gates(request.session_id, request.seq, x, tenant=TENANT.get())
        response = lstm_pb2.StepResponse(
            session_id=outcome.session_id, seq=outcome.seq, outputs=codec.to_tensor(outcome.outputs)
        )
        if outcome.gates is not None:
            response.gates.CopyFrom(codec.gates(outcome.gates))
        return response

    async def Forecast(self, request: lstm_pb2.ForecastRequest, context: Context) -> lstm_pb2.ForecastResponse:
        x = codec.decode_tensor(request.inputs, "inputs")
        h0 = codec.decode_tensor(request.h0, "h0") if request.HasField("h0") else None
        c0 = codec.decode_tensor(request.c0, "c0") if request.HasField("c0") else None
        outcome = await self.plane.forecast(
            x,
            session_id=request.session_id or None,
            model_name=request.model or None,
            h0=h0,
            c0=c0,
            tenant=TENANT.get(),
        )
        return lstm_pb2.ForecastResponse(
            outputs=codec.to_tensor(outcome.outputs),
            inputs=codec.to_tensor(outcome.inputs),
            h=codec.to_tensor(outcome.h),
            c=codec.to_tensor(outcome.c),
            seq=outcome.seq,
        )

    async def ForkSession(self, request: lstm_pb2.ForkSessionRequest, context: Context) -> lstm_pb2.SessionInfo:
        ttl = codec.seconds(request.idle_ttl) if request.HasField("idle_ttl") else None
        session = await self.plane.fork_session(
            request.session_id, request.new_session_id or None, ttl, tenant=TENANT.get()
        )
        return codec.session_info(session)

    async def ExportSession(
        self, request: lstm_pb2.ExportSessionRequest, context: Context
    ) -> lstm_pb2.ExportSessionResponse:
        blob, session = await self.plane.export_session(request.session_id, tenant=TENANT.get())
        return lstm_pb2.ExportSessionResponse(blob=blob, session=codec.session_info(session))

    async def ImportSession(self, request: lstm_pb2.ImportSessionRequest, context: Context) -> lstm_pb2.SessionInfo:
        ttl = codec.seconds(request.idle_ttl) if request.HasField("idle_ttl") else None
        session = await self.plane.import_session(request.blob, request.session_id or None, ttl, tenant=TENANT.get())
        return codec.session_info(session)

    async def StreamSteps(self, requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[lstm_pb2.StepReply]:
        """Requests are handled concurrently, so that the sessions sharing a stream batch together, and answered as
        they finish; one session's requests keep their order through the data plane's per-session lock.

        A stream that stops being read (the server drains for shutdown, or the stream sat idle past the limit) first
        answers every request it took, then ends with UNAVAILABLE: the client reconnects and resends what was not
        answered, with the same seq.
        """
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        rid = request_id(context)
        peer = peer_host(context)
        tenant = TENANT.get()
        try:
            self.calls.enter(peer, request=False)  # each request of the stream is charged to its tenant's rate
        except LstmServeError as exc:
            code = status_code(exc)
            self.calls.finished("StreamSteps", code, start)
            context.set_trailing_metadata(error_metadata(error_detail(code, exc.message, exc)))
            await context.abort(code, exc.message)
        bound = _bound_sessions(context)  # issue 13: sessions closed with the stream
        replies: asyncio.Queue[lstm_pb2.StepReply | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        answering: set[asyncio.Task[None]] = set()

        def settle(_: object = None) -> None:  # the stream's last reply is queued once nothing can add one
            if reader.done() and not answering:
                replies.put_nowait(None)

        async def answer(data: bytes) -> None:
            try:
                reply = await self._stream_step(data, rid, tenant)
                if bound is not None and not reply.HasField("error"):
                    self.plane.bind(bound, reply.session_id, tenant=tenant)
                replies.put_nowait(reply)
            finally:
                answering.discard(asyncio.current_task())
                settle()

        async def read() -> None:
            async for data in requests:
                self.calls.stream_received(reader)
                await window.acquire()
                answering.add(asyncio.create_task(answer(data)))

        reader = asyncio.create_task(read())
        self.calls.watch_stream(reader)
        reader.add_done_callback(settle)
        try:
            while (reply := await replies.get()) is not None:
                window.release()
                yield reply
            if reader.cancelled():  # drained or idle: everything taken is answered; now send the client elsewhere
                raise ShuttingDown(
                    "the server is shutting down; reconnect and resend unanswered steps"
                    if self.calls.draining
                    else f"stream idle for {self.calls.limits.stream_idle_timeout:g} s; reconnect when needed"
                )
            reader.result()  # re-raises a failure of the request side
        except ShuttingDown as exc:
            code = status_code(exc)
            context.set_trailing_metadata(error_metadata(error_detail(code, exc.message, exc)))
            await context.abort(code, exc.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.RpcError:  # the client went away: nobody to answer
            code = grpc.StatusCode.CANCELLED
        except Exception:
            code = grpc.StatusCode.INTERNAL
            self.calls.failed("StreamSteps", None, context)
            await context.abort(code, INTERNAL_MESSAGE)
        finally:
            reader.cancel()
            for pending in list(answering):
                pending.cancel()
            if bound:
                self.plane.release_bound(bound, tenant=tenant, ended_by_client=code == grpc.StatusCode.OK)
            self.calls.leave(peer)
            self.calls.finished("StreamSteps", code, start)

    async def _stream_step(self, data: bytes, rid: str | None, tenant: str) -> lstm_pb2.StepReply:
        """One request of a stream, answered in-band: its failure is its own, the stream goes on."""
        request: lstm_pb2.StepRequest | None = None
        code = grpc.StatusCode.OK
        reply = lstm_pb2.StepReply()
        try:
            request = parse(lstm_pb2.StepRequest, data)
            reply.session_id, reply.seq = request.session_id, request.seq
            self.calls.charge()
            if request.with_gates:
                raise InvalidInput("with_gates is answered by Step only, not over StreamSteps")
            x = codec.decode_tensor(request.inputs, "inputs")
            outcome = await self.plane.step(request.session_id, request.seq, x, tenant=tenant)
            reply.outputs.CopyFrom(codec.to_tensor(outcome.outputs))
        except LstmServeError as exc:
            code = status_code(exc)
            reply.error.CopyFrom(error_detail(code, exc.message, exc))
            self.calls.refused("StreamSteps.request", request, rid, code, exc.message)
        except Exception:
            code = grpc.StatusCode.INTERNAL
            extra = {"session_id": reply.session_id, "seq": reply.seq, "request_id": rid}
            log.exception("StreamSteps request failed", extra=extra)
            reply.error.CopyFrom(error_detail(code, INTERNAL_MESSAGE))
        self.metrics.stream_request(code.name)
        return reply


BIND_SESSIONS_KEY = "lstm-bind-sessions"


def _bound_sessions(context: Context) -> set[str] | None:
    """A set to collect the sessions this stream steps, when its metadata binds them to it (lstm-bind-sessions: 1)."""
    for key, value in context.invocation_metadata() or ():
        if key == BIND_SESSIONS_KEY and str(value).strip().lower() in ("1", "true"):
            return set()
    return None


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data
