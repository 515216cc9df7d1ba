"""Proto <-> domain conversions for the servicer."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from lstm_client._proto.lstm.v1 import lstm_pb2
from lstm_client.tensor import TensorDecodeError, from_tensor, to_tensor
from lstm_serve.dataplane import F32, ModelInfo, Session, VersionView
from lstm_serve.errors import InvalidInput

__all__ = ["decode_tensor", "failures", "model_info", "seconds", "session_info", "to_tensor", "version_info"]


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
