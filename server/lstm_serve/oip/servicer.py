"""inference.GRPCInferenceService (the Open Inference Protocol, KServe v2, with Triton's streaming extension) over
grpc.aio: a second thin transport beside service/, over the same DataPlane, sharing service/calls.py (admission,
limits, parsing, timing, metrics, logs) and service/status.py (domain error -> status).

The mapping onto sessions: a request without a sequence_id is stateless (DataPlane.predict over the time steps it
holds). With one, the sequence is the session codec.session_id(model, sequence_id): sequence_start creates it (anew,
when the id is in use), each request is one step of it carrying all its time steps, and sequence_end
closes it after the answer is computed. A request may carry lstm_seq, its sequence number (1 for the start request,
then 2, 3, ...): a resend with the same lstm_seq is answered from the stored reply instead of being applied again.
Without lstm_seq a request is the session's next step, so a resend is applied again, as Triton would.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from lstm_serve._proto.inference import grpc_service_pb2 as pb
from lstm_serve.dataplane import F32, DataPlane, ModelInfo, StepOutcome
from lstm_serve.errors import (
    InvalidInput,
    LstmServeError,
    ModelNotFound,
    SequenceMismatch,
    SessionExists,
    SessionNotFound,
    StoreUnavailable,
)
from lstm_serve.keyed_lock import KeyedLock
from lstm_serve.oip import codec
from lstm_serve.service.calls import TENANT, Calls, Context, StreamReplies, parse, request_id
from lstm_serve.service.status import INTERNAL_MESSAGE, status_code

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
STREAM_WINDOW = 256  # requests of one stream in flight (computing or waiting to be sent) at most
STREAM_REQUEST = "ModelStreamInfer.request"  # the method field of a stream request's log lines


class OipServicer:
    def __init__(self, plane: DataPlane, calls: Calls, ready: Callable[[], bool]) -> None:
        self.plane = plane
        self.calls = calls
        self._ready = ready
        # A request without lstm_seq is "the next step": reading the session's seq and stepping must not interleave
        # with another request of the same sequence, so they run one at a time per sequence, in arrival order.
        self._order = KeyedLock()

    def register(self, server: grpc.aio.Server) -> None:
        unary: dict[str, tuple[type[Any], Callable[[Any, Context], Awaitable[Any]]]] = {
            "ServerLive": (pb.ServerLiveRequest, self.ServerLive),
            "ServerReady": (pb.ServerReadyRequest, self.ServerReady),
            "ModelReady": (pb.ModelReadyRequest, self.ModelReady),
            "ServerMetadata": (pb.ServerMetadataRequest, self.ServerMetadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self.ModelMetadata),
            "ModelInfer": (pb.ModelInferRequest, self.ModelInfer),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self.calls.unary(name, message_type, handler, service=SERVICE), response_serializer=_serialize
            )
            for name, (message_type, handler) in unary.items()
        }
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.ModelStreamInfer, response_serializer=_serialize
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    # --- health and metadata ------------------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        try:
            self._model(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return codec.server_metadata()

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        return codec.model_metadata(self._model(request.name, request.version))

    def _model(self, name: str, version: str) -> ModelInfo:
        """The model's latest ready version, or the version named (OIP names versions as strings; ours are whole
        numbers)."""
        if not version:
            return self.plane.model(name).info
        if not version.isdigit() or len(version) > 9:
            raise ModelNotFound(f"model {name!r} has no version {version[:64]!r}: versions are whole numbers")
        return self.plane.model(name, int(version)).info

    # --- inference ----------------------------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return await self.infer(request, TENANT.get())

    async def ModelStreamInfer(
        self, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request is answered in-band (error_message on failure; the stream goes on), as soon as it is done:
        requests of different sequences batch together, those of one sequence keep their order."""
        rid, tenant = request_id(context), TENANT.get()

        async def answer(data: bytes, replies: StreamReplies[pb.ModelStreamInferResponse], arrived: float) -> None:
            replies.answer(*await self._stream_request(data, rid, tenant), arrived)

        def take(data: bytes, replies: StreamReplies[pb.ModelStreamInferResponse]) -> None:
            # a sequence's requests take several data plane calls: a task each
            replies.spawn(answer(data, replies, replies.arrived))

        async for reply in self.calls.stream(
            "ModelStreamInfer", requests, context, take, STREAM_WINDOW, service=SERVICE
        ):
            yield reply

    async def _stream_request(
        self, data: bytes, rid: str | None, tenant: str
    ) -> tuple[pb.ModelStreamInferResponse, grpc.StatusCode]:
        """A stream request's answer and its in-band code (counted and timed by StreamReplies.answer)."""
        code = grpc.StatusCode.OK
        request: pb.ModelInferRequest | None = None
        try:
            request = parse(pb.ModelInferRequest, data)
            self.calls.charge()
            reply = pb.ModelStreamInferResponse(infer_response=await self.infer(request, tenant))
        except LstmServeError as exc:
            code = status_code(exc)
            self.calls.refused(STREAM_REQUEST, request, rid, code, exc.message)
            reply = _stream_error(request, exc.message, code, exc.reason)
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", STREAM_REQUEST, extra={"method": STREAM_REQUEST, "request_id": rid})
            reply = _stream_error(request, INTERNAL_MESSAGE, code, "internal")
        return reply, code

    async def infer(self, request: pb.ModelInferRequest, tenant: str) -> pb.ModelInferResponse:
        info = self._model(request.model_name, request.model_version)
        control = codec.sequence_control(request)
        xs, timed = codec.decode_input(request, info)
        codec.check_outputs(request, info)
        if control is None:
            ys, _, _ = await self.plane.predict(info.name, xs, None, None)
            return codec.infer_response(request, info, ys, timed, None)
        sid = codec.session_id(info.name, control.sequence_id)
        order_key = f"{tenant}/{sid}"
        await self._order.acquire(order_key)
        try:
            outcome = await self._sequence_step(info, sid, control, xs, tenant)
            if control.end:
                await self._end(sid, tenant)
        finally:
            self._order.release(order_key)
        return codec.infer_response(request, info, outcome.outputs, timed, outcome.seq)

    async def _sequence_step(
        self, info: ModelInfo, sid: str, control: codec.SequenceControl, xs: F32, tenant: str
    ) -> StepOutcome:
        plane = self.plane
        if control.start:
            if control.seq not in (None, 1):
                raise InvalidInput(
                    f"a {codec.SEQUENCE_START} request is its sequence's first: {codec.LSTM_SEQ} must be 1 there, "
                    f"got {control.seq}"
                )
            try:
                await plane.create_session(info.name, sid, None, tenant=tenant, version=info.version)
            except SessionExists:
                if control.seq == 1 and (await plane.get_session(sid, tenant=tenant)).seq == 1:
                    try:  # a resend of the start request: its stored reply
                        return await plane.step(sid, 1, xs, tenant=tenant)
                    except SequenceMismatch:  # another first step: a new sequence under the same id
                        pass
                # A new sequence under an id in use: a new session (its seq starts again at 1, as lstm_seq does; a
                # reset would zero the state but keep counting)
                await plane.close_session(sid, tenant=tenant)
                await plane.create_session(info.name, sid, None, tenant=tenant, version=info.version)
            return await plane.step(sid, 1, xs, tenant=tenant)
        try:
            seq = control.seq
            if seq is None:
                seq = (await plane.get_session(sid, tenant=tenant)).seq + 1
            return await plane.step(sid, seq, xs, tenant=tenant)
        except SessionNotFound as exc:
            # Triton's answer (INVALID_ARGUMENT, these words) to a sequence it does not know, and why we do not
            error = InvalidInput(
                f"inference request for sequence {control.sequence_id} to model '{info.name}' must specify the START "
                f"flag on the first request of the sequence ({exc.message})"
            )
            error.reason = exc.reason
            raise error from None

    async def _end(self, sid: str, tenant: str) -> None:
        """Closes the sequence's session once its last request is computed. Its answer stands even if the close
        fails: the session then ends at its idle expiry, or with the next sequence_start of its id."""
        try:
            await self.plane.close_session(sid, tenant=tenant)
        except (SessionNotFound, StoreUnavailable) as exc:
            log.info("sequence end: session %s not closed: %s", sid, exc.message, extra={"session_id": sid})


def _stream_error(
    request: pb.ModelInferRequest | None, message: str, code: grpc.StatusCode, reason: str
) -> pb.ModelStreamInferResponse:
    """A failed stream request's answer: the message (what tritonclient shows), and for clients that look further,
    the request's id and the status code and reason as response parameters."""
    response = pb.ModelInferResponse()
    if request is not None:
        response.model_name, response.model_version, response.id = (
            request.model_name,
            request.model_version,
            request.id,
        )
    response.parameters["lstm_error_code"].string_param = code.name
    response.parameters["lstm_error_reason"].string_param = reason
    return pb.ModelStreamInferResponse(error_message=message, infer_response=response)


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data
