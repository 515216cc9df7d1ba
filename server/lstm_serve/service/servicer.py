"""lstm.v1.LstmService over grpc.aio: a thin layer of proto decoding and encoding around the DataPlane.

Each method here is the protocol mapping only; admission, parsing, timing, metrics, logging and error mapping are
shared by every method in service/calls.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from lstm_client._proto.lstm.v1 import lstm_pb2
from lstm_serve.dataplane import DataPlane, StepItem, StepOutcome
from lstm_serve.errors import InvalidInput, LstmServeError, ShuttingDown
from lstm_serve.service import codec
from lstm_serve.service.calls import TENANT, Calls, Context, StreamReplies, parse, request_id
from lstm_serve.service.status import INTERNAL_MESSAGE, error_detail, status_code

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
            "StepMany": (lstm_pb2.StepManyRequest, self.StepMany),
            "GetServerInfo": (lstm_pb2.GetServerInfoRequest, self.GetServerInfo),
            # issue 13
            "Forecast": (lstm_pb2.ForecastRequest, self.Forecast),
            "ForkSession": (lstm_pb2.ForkSessionRequest, self.ForkSession),
            "ExportSession": (lstm_pb2.ExportSessionRequest, self.ExportSession),
            "ImportSession": (lstm_pb2.ImportSessionRequest, self.ImportSession),
        }
        serialize = lstm_pb2.StepReply.SerializeToString
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self.calls.unary(name, message_type, handler, service=SERVICE), response_serializer=_serialize
            )
            for name, (message_type, handler) in unary.items()
        }
        handlers["StreamSteps"] = grpc.stream_stream_rpc_method_handler(self.StreamSteps, response_serializer=serialize)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    async def ListModels(self, request: lstm_pb2.ListModelsRequest, context: Context) -> lstm_pb2.ListModelsResponse:
        return lstm_pb2.ListModelsResponse(
            models=[codec.version_info(v) for v in self.plane.model_versions()],
            failures=codec.failures(self.plane.model_failures()),
        )

    async def GetModel(self, request: lstm_pb2.GetModelRequest, context: Context) -> lstm_pb2.ModelInfo:
        info = self.plane.model(request.name, request.version or None).info
        return next(codec.version_info(v) for v in self.plane.model_versions() if v.info is info)

    async def CreateSession(self, request: lstm_pb2.CreateSessionRequest, context: Context) -> lstm_pb2.SessionInfo:
        ttl = codec.seconds(request.idle_ttl) if request.HasField("idle_ttl") else None
        h0 = codec.decode_tensor(request.h0, "h0") if request.HasField("h0") else None
        c0 = codec.decode_tensor(request.c0, "c0") if request.HasField("c0") else None
        session = await self.plane.create_session(
            request.model,
            request.session_id or None,
            ttl,
            tenant=TENANT.get(),
            version=request.model_version or None,
            h0=h0,
            c0=c0,
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

    async def StepMany(self, request: lstm_pb2.StepManyRequest, context: Context) -> lstm_pb2.StepManyResponse:
        replies = await self._step_many(request.steps, "StepMany", request_id(context), TENANT.get())
        return lstm_pb2.StepManyResponse(replies=replies)

    async def _step_many(
        self, steps: Sequence[lstm_pb2.StepRequest], method: str, rid: str | None, tenant: str
    ) -> list[lstm_pb2.StepReply]:
        """The steps of a many-session message, each answered in-band: one step's failure is its own."""
        replies = [lstm_pb2.StepReply(session_id=step.session_id, seq=step.seq) for step in steps]
        items: list[StepItem] = []
        taken: list[int] = []
        for i, step in enumerate(steps):
            try:
                if step.steps:
                    raise InvalidInput("a step inside a many-session message may not carry steps of its own")
                items.append(StepItem(step.session_id, step.seq, codec.decode_tensor(step.inputs, "inputs")))
                taken.append(i)
            except LstmServeError as exc:
                self._answer_error(replies[i], exc, method, step, rid)
        outcomes = await self.plane.step_many(items, tenant=tenant)
        for i, outcome in zip(taken, outcomes, strict=True):
            if isinstance(outcome, StepOutcome):
                codec.fill_tensor(replies[i].outputs, outcome.outputs)
            else:
                self._answer_error(replies[i], outcome, method, steps[i], rid)
        return replies

    def _answer_error(
        self, reply: lstm_pb2.StepReply, exc: Exception, method: str, request: object, rid: str | None
    ) -> None:
        """Puts a step's failure into its reply: a domain error with its status; anything else is a bug, logged and
        answered INTERNAL."""
        if isinstance(exc, LstmServeError):
            code = status_code(exc)
            reply.error.CopyFrom(error_detail(code, exc.message, exc))
            self.calls.refused(method, request, rid, code, exc.message)
        else:
            extra = {"session_id": reply.session_id, "seq": reply.seq, "request_id": rid}
            log.error("%s step failed", method, exc_info=exc, extra=extra)
            reply.error.CopyFrom(error_detail(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE))

    async def Predict(self, request: lstm_pb2.PredictRequest, context: Context) -> lstm_pb2.PredictResponse:
        x = codec.decode_tensor(request.inputs, "inputs")
        h0 = codec.decode_tensor(request.h0, "h0") if request.HasField("h0") else None
        c0 = codec.decode_tensor(request.c0, "c0") if request.HasField("c0") else None
        ys, h, c = await self.plane.predict(request.model, x, h0, c0)
        return lstm_pb2.PredictResponse(outputs=codec.to_tensor(ys), h=codec.to_tensor(h), c=codec.to_tensor(c))

    async def GetServerInfo(
        self, request: lstm_pb2.GetServerInfoRequest, context: Context
    ) -> lstm_pb2.GetServerInfoResponse:
        limits = self.calls.limits
        return codec.server_info(
            self.plane.session_limits(),
            stream_window=STREAM_WINDOW,
            max_message_bytes=limits.max_message_bytes,
            max_calls=limits.max_calls,
            max_calls_per_peer=limits.max_calls_per_peer,
            stream_idle_timeout=limits.stream_idle_timeout,
            tenant_rate=limits.tenant_rate,
            tenant_burst=self.calls.tenant_burst,
        )

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
        """Requests are taken as they arrive and answered as they finish (Calls.stream), so that the sessions sharing
        a stream (and the other streams' sessions) batch together; one session's requests keep their order through
        the data plane. No task per request: each becomes a future of the data plane whose callback answers."""
        tenant = TENANT.get()
        bound = _bound_sessions(context)  # sessions closed with the stream (lstm-bind-sessions: 1)
        take = functools.partial(self._take, request_id(context), tenant, bound)
        on_end = None if bound is None else functools.partial(self._release_bound, bound, tenant)
        async for reply in self.calls.stream(
            "StreamSteps", requests, context, take, STREAM_WINDOW, on_end=on_end, service=SERVICE
        ):
            yield reply

    def _release_bound(self, bound: set[str], tenant: str, code: grpc.StatusCode) -> None:
        if bound:
            self.plane.release_bound(bound, tenant=tenant, ended_by_client=code == grpc.StatusCode.OK)

    def _take(
        self,
        rid: str | None,
        tenant: str,
        bound: set[str] | None,
        data: bytes,
        stream: StreamReplies[lstm_pb2.StepReply],
    ) -> None:
        """One request of a stream, answered in-band (its failure is its own, the stream goes on): parsed and
        checked here, then handed to the data plane, whose future's callback answers."""
        request: lstm_pb2.StepRequest | None = None
        reply = lstm_pb2.StepReply()
        arrived = stream.arrived
        try:
            request = parse(lstm_pb2.StepRequest, data)
            reply.session_id, reply.seq = request.session_id, request.seq
            self.calls.charge()
            if request.with_gates:
                raise InvalidInput("with_gates is answered by Step only, not over StreamSteps", "with_gates")
            if request.steps:
                if request.session_id or request.seq or request.HasField("inputs"):
                    raise InvalidInput("a request that carries steps names no session of its own")
                stream.spawn(self._answer_many(request.steps, reply, rid, tenant, stream, arrived))
                return
            x = codec.decode_tensor(request.inputs, "inputs")
        except Exception as exc:
            self._answer(stream, reply, exc, request, rid, arrived)
            return
        future = self.plane.submit_step(request.session_id, request.seq, x, tenant=tenant)
        future.add_done_callback(functools.partial(self._stepped, stream, reply, request, rid, bound, tenant, arrived))

    def _stepped(
        self,
        stream: StreamReplies[lstm_pb2.StepReply],
        reply: lstm_pb2.StepReply,
        request: lstm_pb2.StepRequest,
        rid: str | None,
        bound: set[str] | None,
        tenant: str,
        arrived: float,
        future: asyncio.Future[StepOutcome],
    ) -> None:
        """The callback of a stream request's step: answers it, whatever happened (the stream waits for it)."""
        failure: Exception | None
        if future.cancelled():
            failure = ShuttingDown("the server is shutting down; retry")
        elif (exc := future.exception()) is not None:
            failure = exc if isinstance(exc, Exception) else RuntimeError(exc)
        else:
            try:
                codec.fill_tensor(reply.outputs, future.result().outputs)
                failure = None
                if bound is not None:
                    self.plane.bind(bound, reply.session_id, tenant=tenant)
            except Exception as exc:  # a bug: answered INTERNAL rather than left hanging
                failure = exc
        self._answer(stream, reply, failure, request, rid, arrived)

    async def _answer_many(
        self,
        steps: Sequence[lstm_pb2.StepRequest],
        reply: lstm_pb2.StepReply,
        rid: str | None,
        tenant: str,
        stream: StreamReplies[lstm_pb2.StepReply],
        arrived: float,
    ) -> None:
        try:
            reply.replies.extend(await self._step_many(steps, "StreamSteps.many", rid, tenant))
        except Exception as exc:
            self._answer(stream, reply, exc, None, rid, arrived)
            return
        self._answer(stream, reply, None, None, rid, arrived)

    def _answer(
        self,
        stream: StreamReplies[lstm_pb2.StepReply],
        reply: lstm_pb2.StepReply,
        exc: Exception | None,
        request: lstm_pb2.StepRequest | None,
        rid: str | None,
        arrived: float,
    ) -> None:
        code = grpc.StatusCode.OK
        if exc is not None:
            code = status_code(exc) if isinstance(exc, LstmServeError) else grpc.StatusCode.INTERNAL
            self._answer_error(reply, exc, "StreamSteps.request", request, rid)
        stream.answer(reply, code, arrived)  # counts the code, times the request


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
