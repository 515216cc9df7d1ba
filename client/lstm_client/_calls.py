"""What the sync and async clients share: request building, response decoding and result types (retries: `_retry`).

The two clients differ only in how they wait (blocking vs `await`); everything they compute goes through here, so the
twins stay thin and cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from google.protobuf import duration_pb2

from lstm_client._proto.lstm.v1 import lstm_pb2
from lstm_client.errors import LstmError, ServerError, error_from_detail
from lstm_client.tensor import FloatArray, from_tensor, to_tensor


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str
    description: str
    backend: str
    input_size: int
    hidden_size: int
    num_layers: int
    output_size: int
    input_features: tuple[str, ...]
    output_features: tuple[str, ...]
    normalized: bool
    state: str = ""  # "ready", or "unloading": retired, serving only the sessions pinned to it
    latest: bool = False  # the version a session gets when it names none
    # (input index, output index, "value" | "delta"): the outputs a forecast feeds back as inputs
    feedback: tuple[tuple[int, int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ModelFailure:
    name: str
    error: str


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    model: str
    seq: int
    steps: int
    created: datetime
    last_used: datetime
    idle_ttl: timedelta | None  # None: never expires by idleness
    model_version: int = 0  # the model version the session is pinned to


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The server's versions and the limits a client must respect (GetServerInfo; see ServerLimits in the proto)."""

    server_version: str
    protocol: str  # "lstm.v1"
    max_steps_per_request: int
    max_stream_requests_in_flight: int
    max_message_bytes: int
    max_sessions: int
    max_sessions_policy: str  # "evict" or "refuse"
    max_sessions_per_tenant: int  # 0: no limit
    default_idle_ttl: timedelta | None  # None: no idle expiry
    max_idle_ttl: timedelta
    max_session_id_length: int
    max_calls_per_peer: int
    max_calls: int
    stream_idle_timeout: timedelta | None  # None: never
    tenant_rate: float  # requests per second; 0: no limit
    tenant_burst: int


@dataclass(frozen=True, slots=True)
class Prediction:
    outputs: FloatArray  # [T, output_size]
    h: FloatArray  # [num_layers, hidden_size]
    c: FloatArray  # [num_layers, hidden_size]


def model_info(msg: lstm_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=msg.name,
        version=msg.version,
        description=msg.description,
        backend=msg.backend,
        input_size=msg.input_size,
        hidden_size=msg.hidden_size,
        num_layers=msg.num_layers,
        output_size=msg.output_size,
        input_features=tuple(msg.input_features),
        output_features=tuple(msg.output_features),
        normalized=msg.normalized,
        state=msg.state,
        latest=msg.latest,
        feedback=tuple((f.input, f.output, f.mode) for f in msg.feedback),
    )


def model_list(msg: lstm_pb2.ListModelsResponse) -> tuple[list[ModelInfo], list[ModelFailure]]:
    return [model_info(m) for m in msg.models], [ModelFailure(f.name, f.error) for f in msg.failures]


def session_info(msg: lstm_pb2.SessionInfo) -> SessionInfo:
    ttl = msg.idle_ttl.ToTimedelta()
    return SessionInfo(
        session_id=msg.session_id,
        model=msg.model,
        seq=msg.seq,
        steps=msg.steps,
        created=msg.created.ToDatetime(tzinfo=UTC),
        last_used=msg.last_used.ToDatetime(tzinfo=UTC),
        idle_ttl=ttl if ttl > timedelta(0) else None,
        model_version=msg.model_version,
    )


def server_info(msg: lstm_pb2.GetServerInfoResponse) -> ServerInfo:
    limits = msg.limits

    def optional(d: duration_pb2.Duration) -> timedelta | None:
        t = d.ToTimedelta()
        return t if t > timedelta(0) else None

    return ServerInfo(
        server_version=msg.server_version,
        protocol=msg.protocol,
        max_steps_per_request=limits.max_steps_per_request,
        max_stream_requests_in_flight=limits.max_stream_requests_in_flight,
        max_message_bytes=limits.max_message_bytes,
        max_sessions=limits.max_sessions,
        max_sessions_policy=limits.max_sessions_policy,
        max_sessions_per_tenant=limits.max_sessions_per_tenant,
        default_idle_ttl=optional(limits.default_idle_ttl),
        max_idle_ttl=limits.max_idle_ttl.ToTimedelta(),
        max_session_id_length=limits.max_session_id_length,
        max_calls_per_peer=limits.max_calls_per_peer,
        max_calls=limits.max_calls,
        stream_idle_timeout=optional(limits.stream_idle_timeout),
        tenant_rate=limits.tenant_rate,
        tenant_burst=limits.tenant_burst,
    )


def create_session_request(
    model: str,
    ttl: float | timedelta | None,
    session_id: str | None,
    model_version: int = 0,
    h0: npt.ArrayLike | None = None,
    c0: npt.ArrayLike | None = None,
) -> lstm_pb2.CreateSessionRequest:
    """`ttl` None keeps the server's default; 0 means never expire; `model_version` 0: the latest ready version.
    `h0` / `c0`: the initial state, zeros if unset."""
    req = lstm_pb2.CreateSessionRequest(model=model, session_id=session_id or "", model_version=model_version)
    _set_ttl(req, ttl)
    if h0 is not None:
        req.h0.CopyFrom(to_tensor(h0))
    if c0 is not None:
        req.c0.CopyFrom(to_tensor(c0))
    return req


def _set_ttl(
    req: lstm_pb2.CreateSessionRequest | lstm_pb2.ForkSessionRequest | lstm_pb2.ImportSessionRequest,
    ttl: float | timedelta | None,
) -> None:
    if ttl is not None:
        duration = duration_pb2.Duration()
        duration.FromTimedelta(ttl if isinstance(ttl, timedelta) else timedelta(seconds=ttl))
        req.idle_ttl.CopyFrom(duration)


def is_fresh_session(msg: lstm_pb2.SessionInfo, model: str | None) -> bool:
    """Whether a session found under the id we asked CreateSession (ForkSession, ImportSession) for is the one our
    lost reply created: untouched (seq 0) and of our model (when we know it). (A client-chosen id is the caller's to
    keep unique, so nobody else's session is expected there.)"""
    return msg.seq == 0 and (model is None or msg.model == model)


def step_request(session_id: str, seq: int, x: npt.ArrayLike) -> lstm_pb2.StepRequest:
    return lstm_pb2.StepRequest(session_id=session_id, seq=seq, inputs=to_tensor(x))


def step_outputs(reply: lstm_pb2.StepResponse | lstm_pb2.StepReply) -> FloatArray:
    """Outputs of a step; an in-band stream error is raised as the matching LstmError."""
    if isinstance(reply, lstm_pb2.StepReply):
        result = reply.WhichOneof("result")
        if result == "error":
            raise error_from_detail(reply.error)
        if result is None:
            raise ServerError("the server sent a StepReply with neither outputs nor error")
    return from_tensor(reply.outputs)


class _Stepping(Protocol):
    """A session as step_many needs it (Session and AsyncSession): its id, and the seq it has reached."""

    id: str
    seq: int


S = TypeVar("S", bound=_Stepping)


@dataclass(frozen=True, slots=True)
class ManyResult(Generic[S]):
    """What a many-session step gave each session: its outputs, or the error that refused its step (that session's
    seq did not advance; the others' did)."""

    outputs: dict[S, FloatArray] = field(default_factory=dict)
    errors: dict[S, LstmError] = field(default_factory=dict)


def step_many_request(steps: Mapping[S, npt.ArrayLike]) -> lstm_pb2.StepManyRequest:
    return lstm_pb2.StepManyRequest(steps=[step_request(s.id, s.seq + 1, x) for s, x in steps.items()])


def many_result(sessions: list[S], replies: Sequence[lstm_pb2.StepReply]) -> ManyResult[S]:
    """Sorts the replies (in the request's order) into outputs and errors, advancing the seq of each session whose
    step was applied."""
    if len(replies) != len(sessions):
        raise LstmError(f"the server answered {len(replies)} of {len(sessions)} steps")
    result: ManyResult[S] = ManyResult()
    for session, reply in zip(sessions, replies, strict=True):
        if reply.HasField("error"):
            result.errors[session] = error_from_detail(reply.error)
        else:
            result.outputs[session] = from_tensor(reply.outputs)
            session.seq += 1
    return result


def predict_request(
    model: str, xs: npt.ArrayLike, h0: npt.ArrayLike | None, c0: npt.ArrayLike | None
) -> lstm_pb2.PredictRequest:
    req = lstm_pb2.PredictRequest(model=model, inputs=to_tensor(np.atleast_2d(np.asarray(xs))))
    if h0 is not None:
        req.h0.CopyFrom(to_tensor(h0))
    if c0 is not None:
        req.c0.CopyFrom(to_tensor(c0))
    return req


def prediction(msg: lstm_pb2.PredictResponse) -> Prediction:
    return Prediction(outputs=from_tensor(msg.outputs), h=from_tensor(msg.h), c=from_tensor(msg.c))


# --- issue 13: forecasts, forks, portable state, gates, sessions bound to a stream ---------------------------------

# StreamSteps metadata: the sessions the stream steps are closed when it ends (at once when the client ends it;
# after the server's grace, unless stepped again, when it breaks). Sent again on every reconnect.
BIND_SESSIONS = ("lstm-bind-sessions", "1")


def stream_metadata(metadata: tuple[tuple[str, str], ...] | None, bind: bool) -> tuple[tuple[str, str], ...] | None:
    return (*(metadata or ()), BIND_SESSIONS) if bind else metadata


@dataclass(frozen=True, slots=True)
class Forecast:
    outputs: FloatArray  # [horizon, output_size]
    inputs: FloatArray  # [horizon, input_size]: the inputs used, fed-back columns filled in
    h: FloatArray  # [num_layers, hidden_size] after the last step (nothing was committed)
    c: FloatArray
    seq: int  # the session's seq the forecast started from (0 from a model's state)


@dataclass(frozen=True, slots=True)
class Gates:
    """The cell's internals of one Step, each [T, num_layers, hidden_size] (T = 1 for a single-step request)."""

    forget: FloatArray
    input: FloatArray
    output: FloatArray
    candidate: FloatArray
    c: FloatArray
    h: FloatArray

    def as_dict(self) -> dict[str, FloatArray]:
        names = ("forget", "input", "output", "candidate", "c", "h")
        return {name: getattr(self, name) for name in names}


def forecast_request(
    inputs: npt.ArrayLike,
    *,
    session_id: str | None = None,
    model: str | None = None,
    h0: npt.ArrayLike | None = None,
    c0: npt.ArrayLike | None = None,
) -> lstm_pb2.ForecastRequest:
    """`inputs` [horizon, input_size]; the fed-back columns of rows 1.. may be NaN (they are filled in)."""
    req = lstm_pb2.ForecastRequest(
        session_id=session_id or "", model=model or "", inputs=to_tensor(np.atleast_2d(np.asarray(inputs)))
    )
    if h0 is not None:
        req.h0.CopyFrom(to_tensor(h0))
    if c0 is not None:
        req.c0.CopyFrom(to_tensor(c0))
    return req


def forecast(msg: lstm_pb2.ForecastResponse) -> Forecast:
    return Forecast(
        outputs=from_tensor(msg.outputs),
        inputs=from_tensor(msg.inputs),
        h=from_tensor(msg.h),
        c=from_tensor(msg.c),
        seq=msg.seq,
    )


def fork_request(
    session_id: str, new_session_id: str | None, ttl: float | timedelta | None
) -> lstm_pb2.ForkSessionRequest:
    req = lstm_pb2.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id or "")
    _set_ttl(req, ttl)
    return req


def import_request(blob: bytes, session_id: str | None, ttl: float | timedelta | None) -> lstm_pb2.ImportSessionRequest:
    req = lstm_pb2.ImportSessionRequest(blob=blob, session_id=session_id or "")
    _set_ttl(req, ttl)
    return req


def gated_step_request(session_id: str, seq: int, x: npt.ArrayLike) -> lstm_pb2.StepRequest:
    return lstm_pb2.StepRequest(session_id=session_id, seq=seq, inputs=to_tensor(x), with_gates=True)


def step_gates(reply: lstm_pb2.StepResponse) -> Gates | None:
    """The gates of a Step asked with_gates; None when the reply was a retry's stored one."""
    if not reply.HasField("gates"):
        return None
    g = reply.gates
    return Gates(
        forget=from_tensor(g.forget),
        input=from_tensor(g.input),
        output=from_tensor(g.output),
        candidate=from_tensor(g.candidate),
        c=from_tensor(g.c),
        h=from_tensor(g.h),
    )
