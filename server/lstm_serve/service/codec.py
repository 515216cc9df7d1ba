"""Proto <-> domain conversions for the servicer."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from lstm_client._proto.lstm.v1 import lstm_pb2
from lstm_client.tensor import TensorDecodeError, from_tensor, to_tensor
from lstm_serve.dataplane import F32, GateTrace, ModelInfo, Session
from lstm_serve.errors import InvalidInput

__all__ = ["decode_tensor", "gates", "model_info", "seconds", "session_info", "to_tensor"]


def decode_tensor(tensor: lstm_pb2.Tensor, name: str) -> F32:
    if not tensor.shape and not tensor.data:
        raise InvalidInput(f"{name} is missing (empty tensor)")
    try:
        return from_tensor(tensor)
    except TensorDecodeError as exc:
        raise InvalidInput(f"{name}: {exc}") from None


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


def model_info(info: ModelInfo) -> lstm_pb2.ModelInfo:
    return lstm_pb2.ModelInfo(
        name=info.name,
        version=info.version,
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
    )
