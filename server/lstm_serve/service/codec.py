"""Proto <-> domain conversions for the servicer."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from lstm_client._proto.lstm.v1 import lstm_pb2
from lstm_client.tensor import WIRE_DTYPE, TensorDecodeError, from_tensor, to_tensor
from lstm_serve import __version__
from lstm_serve.dataplane import F32, GateTrace, ModelInfo, Session, SessionLimits, VersionView
from lstm_serve.errors import InvalidInput

__all__ = [
    "decode_tensor",
    "failures",
    "fill_tensor",
    "gates",
    "model_info",
    "seconds",
    "server_info",
    "session_info",
    "to_tensor",
    "version_info",
]

UINT32_MAX = 2**32 - 1


def decode_tensor(tensor: lstm_pb2.Tensor, name: str) -> F32:
    if not tensor.shape and not tensor.data:
        raise InvalidInput(f"{name} is missing (empty tensor)", name)
    try:
        return from_tensor(tensor)
    except TensorDecodeError as exc:
        raise InvalidInput(f"{name}: {exc}", name) from None


def fill_tensor(tensor: lstm_pb2.Tensor, array: F32) -> None:
    """Writes `array` into a reply's tensor field in place: the many-session path does this per session, and a
    Tensor built apart and then copied in costs twice."""
    tensor.shape.extend(array.shape)
    tensor.data = array.astype(WIRE_DTYPE, copy=False).tobytes()


def seconds(duration: duration_pb2.Duration) -> float:
    return duration.ToNanoseconds() / 1e9


def _timestamp(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _duration(s: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(s * 1e9))
    return d


def version_info(view: VersionView) -> lstm_pb2.ModelInfo:
    message = model_info(view.info)
    message.state, message.latest = view.state.value, view.latest
    return message


def failures(table: dict[str, str]) -> list[lstm_pb2.ModelLoadFailure]:
    """The repository's failures, keyed "model" or "model/version"."""
    out = []
    for key, error in table.items():
        _, slash, version = key.partition("/")
        number = int(version) if slash and version.isdigit() else 0
        out.append(lstm_pb2.ModelLoadFailure(name=key, error=error, version=number))
    return out


def model_info(info: ModelInfo) -> lstm_pb2.ModelInfo:
    return lstm_pb2.ModelInfo(
        name=info.name,
        version=str(info.version),
        description=info.description,
        backend=info.backend,
        input_size=info.input_size,
        hidden_size=info.hidden_size,
        num_layers=info.num_layers,
        output_size=info.output_size,
        input_features=info.input_features,
        output_features=info.output_features,
        normalized=info.normalized,
        feedback=[lstm_pb2.FeedbackLink(input=f.input, output=f.output, mode=f.mode) for f in info.feedback],
    )


def gates(trace: GateTrace) -> lstm_pb2.Gates:
    return lstm_pb2.Gates(
        forget=to_tensor(trace.forget),
        input=to_tensor(trace.input),
        output=to_tensor(trace.output),
        candidate=to_tensor(trace.candidate),
        c=to_tensor(trace.c),
        h=to_tensor(trace.h),
    )


def session_info(session: Session) -> lstm_pb2.SessionInfo:
    return lstm_pb2.SessionInfo(
        session_id=session.id,
        model=session.model,
        seq=session.seq,
        steps=session.steps,
        created=_timestamp(session.created),
        last_used=_timestamp(session.last_used),
        idle_ttl=_duration(session.idle_ttl),
        model_version=session.version,
    )


def server_info(
    sessions: SessionLimits,
    *,
    stream_window: int,
    max_message_bytes: int,
    max_calls: int,
    max_calls_per_peer: int,
    stream_idle_timeout: float,
    tenant_rate: float,
    tenant_burst: int,
) -> lstm_pb2.GetServerInfoResponse:
    """Numbers a setting allows past uint32 (nobody configures 4 billion sessions) are sent as UINT32_MAX."""

    def u32(n: int) -> int:
        return min(max(n, 0), UINT32_MAX)

    limits = lstm_pb2.ServerLimits(
        max_steps_per_request=u32(sessions.max_steps_per_request),
        max_stream_requests_in_flight=u32(stream_window),
        max_message_bytes=u32(max_message_bytes),
        max_sessions=u32(sessions.max_sessions),
        max_sessions_policy=sessions.max_sessions_policy,
        max_sessions_per_tenant=u32(sessions.max_sessions_per_tenant),
        default_idle_ttl=_duration(sessions.default_idle_ttl),
        max_idle_ttl=_duration(sessions.max_idle_ttl),
        max_session_id_length=u32(sessions.max_session_id_chars),
        max_calls_per_peer=u32(max_calls_per_peer),
        max_calls=u32(max_calls),
        stream_idle_timeout=_duration(stream_idle_timeout),
        tenant_rate=tenant_rate,
        tenant_burst=u32(tenant_burst),
    )
    return lstm_pb2.GetServerInfoResponse(
        server_version=__version__, protocol=lstm_pb2.DESCRIPTOR.package, limits=limits
    )
