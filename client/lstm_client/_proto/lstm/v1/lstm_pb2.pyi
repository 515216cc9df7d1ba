from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "reason", "expected_seq")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQ_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    expected_seq: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ..., expected_seq: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "failures")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    failures: _containers.RepeatedCompositeFieldContainer[ModelLoadFailure]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[ModelLoadFailure, _Mapping]]] = ...) -> None: ...

class ModelLoadFailure(_message.Message):
    __slots__ = ("name", "error", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    error: str
    version: int
    def __init__(self, name: _Optional[str] = ..., error: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "description", "backend", "input_size", "hidden_size", "num_layers", "output_size", "input_features", "output_features", "normalized", "state", "latest", "feedback")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    description: str
    backend: str
    input_size: int
    hidden_size: int
    num_layers: int
    output_size: int
    input_features: _containers.RepeatedScalarFieldContainer[str]
    output_features: _containers.RepeatedScalarFieldContainer[str]
    normalized: bool
    state: str
    latest: bool
    feedback: _containers.RepeatedCompositeFieldContainer[FeedbackLink]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., description: _Optional[str] = ..., backend: _Optional[str] = ..., input_size: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., output_size: _Optional[int] = ..., input_features: _Optional[_Iterable[str]] = ..., output_features: _Optional[_Iterable[str]] = ..., normalized: bool = ..., state: _Optional[str] = ..., latest: bool = ..., feedback: _Optional[_Iterable[_Union[FeedbackLink, _Mapping]]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("model", "session_id", "idle_ttl", "model_version", "h0", "c0")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_TTL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    H0_FIELD_NUMBER: _ClassVar[int]
    C0_FIELD_NUMBER: _ClassVar[int]
    model: str
    session_id: str
    idle_ttl: _duration_pb2.Duration
    model_version: int
    h0: Tensor
    c0: Tensor
    def __init__(self, model: _Optional[str] = ..., session_id: _Optional[str] = ..., idle_ttl: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., model_version: _Optional[int] = ..., h0: _Optional[_Union[Tensor, _Mapping]] = ..., c0: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "model", "seq", "steps", "created", "last_used", "idle_ttl", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    IDLE_TTL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    seq: int
    steps: int
    created: _timestamp_pb2.Timestamp
    last_used: _timestamp_pb2.Timestamp
    idle_ttl: _duration_pb2.Duration
    model_version: int
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., seq: _Optional[int] = ..., steps: _Optional[int] = ..., created: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., last_used: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., idle_ttl: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., model_version: _Optional[int] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ResetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "seq", "inputs", "steps", "with_gates")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    WITH_GATES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    inputs: Tensor
    steps: _containers.RepeatedCompositeFieldContainer[StepRequest]
    with_gates: bool
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., steps: _Optional[_Iterable[_Union[StepRequest, _Mapping]]] = ..., with_gates: bool = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("session_id", "seq", "outputs", "gates")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    outputs: Tensor
    gates: Gates
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., outputs: _Optional[_Union[Tensor, _Mapping]] = ..., gates: _Optional[_Union[Gates, _Mapping]] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("session_id", "seq", "outputs", "error", "replies")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    outputs: Tensor
    error: Error
    replies: _containers.RepeatedCompositeFieldContainer[StepReply]
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., outputs: _Optional[_Union[Tensor, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., replies: _Optional[_Iterable[_Union[StepReply, _Mapping]]] = ...) -> None: ...

class StepManyRequest(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[StepRequest]
    def __init__(self, steps: _Optional[_Iterable[_Union[StepRequest, _Mapping]]] = ...) -> None: ...

class StepManyResponse(_message.Message):
    __slots__ = ("replies",)
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[StepReply]
    def __init__(self, replies: _Optional[_Iterable[_Union[StepReply, _Mapping]]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "inputs", "h0", "c0")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    H0_FIELD_NUMBER: _ClassVar[int]
    C0_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: Tensor
    h0: Tensor
    c0: Tensor
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., h0: _Optional[_Union[Tensor, _Mapping]] = ..., c0: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("outputs", "h", "c")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    H_FIELD_NUMBER: _ClassVar[int]
    C_FIELD_NUMBER: _ClassVar[int]
    outputs: Tensor
    h: Tensor
    c: Tensor
    def __init__(self, outputs: _Optional[_Union[Tensor, _Mapping]] = ..., h: _Optional[_Union[Tensor, _Mapping]] = ..., c: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("server_version", "protocol", "limits")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    protocol: str
    limits: ServerLimits
    def __init__(self, server_version: _Optional[str] = ..., protocol: _Optional[str] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_steps_per_request", "max_stream_requests_in_flight", "max_message_bytes", "max_sessions", "max_sessions_policy", "max_sessions_per_tenant", "default_idle_ttl", "max_idle_ttl", "max_session_id_length", "max_calls_per_peer", "max_calls", "stream_idle_timeout", "tenant_rate", "tenant_burst")
    MAX_STEPS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_IDLE_TTL_FIELD_NUMBER: _ClassVar[int]
    MAX_IDLE_TTL_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_ID_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_CALLS_PER_PEER_FIELD_NUMBER: _ClassVar[int]
    MAX_CALLS_FIELD_NUMBER: _ClassVar[int]
    STREAM_IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    TENANT_RATE_FIELD_NUMBER: _ClassVar[int]
    TENANT_BURST_FIELD_NUMBER: _ClassVar[int]
    max_steps_per_request: int
    max_stream_requests_in_flight: int
    max_message_bytes: int
    max_sessions: int
    max_sessions_policy: str
    max_sessions_per_tenant: int
    default_idle_ttl: _duration_pb2.Duration
    max_idle_ttl: _duration_pb2.Duration
    max_session_id_length: int
    max_calls_per_peer: int
    max_calls: int
    stream_idle_timeout: _duration_pb2.Duration
    tenant_rate: float
    tenant_burst: int
    def __init__(self, max_steps_per_request: _Optional[int] = ..., max_stream_requests_in_flight: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_sessions: _Optional[int] = ..., max_sessions_policy: _Optional[str] = ..., max_sessions_per_tenant: _Optional[int] = ..., default_idle_ttl: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., max_idle_ttl: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., max_session_id_length: _Optional[int] = ..., max_calls_per_peer: _Optional[int] = ..., max_calls: _Optional[int] = ..., stream_idle_timeout: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., tenant_rate: _Optional[float] = ..., tenant_burst: _Optional[int] = ...) -> None: ...

class ReloadModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelAdminResponse(_message.Message):
    __slots__ = ("changes", "models", "failures")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    failures: _containers.RepeatedCompositeFieldContainer[ModelLoadFailure]
    def __init__(self, changes: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[ModelLoadFailure, _Mapping]]] = ...) -> None: ...

class FeedbackLink(_message.Message):
    __slots__ = ("input", "output", "mode")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    input: int
    output: int
    mode: str
    def __init__(self, input: _Optional[int] = ..., output: _Optional[int] = ..., mode: _Optional[str] = ...) -> None: ...

class ForecastRequest(_message.Message):
    __slots__ = ("session_id", "model", "h0", "c0", "inputs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    H0_FIELD_NUMBER: _ClassVar[int]
    C0_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    h0: Tensor
    c0: Tensor
    inputs: Tensor
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., h0: _Optional[_Union[Tensor, _Mapping]] = ..., c0: _Optional[_Union[Tensor, _Mapping]] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForecastResponse(_message.Message):
    __slots__ = ("outputs", "inputs", "h", "c", "seq")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    H_FIELD_NUMBER: _ClassVar[int]
    C_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    outputs: Tensor
    inputs: Tensor
    h: Tensor
    c: Tensor
    seq: int
    def __init__(self, outputs: _Optional[_Union[Tensor, _Mapping]] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., h: _Optional[_Union[Tensor, _Mapping]] = ..., c: _Optional[_Union[Tensor, _Mapping]] = ..., seq: _Optional[int] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id", "new_session_id", "idle_ttl")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_TTL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    new_session_id: str
    idle_ttl: _duration_pb2.Duration
    def __init__(self, session_id: _Optional[str] = ..., new_session_id: _Optional[str] = ..., idle_ttl: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ExportSessionResponse(_message.Message):
    __slots__ = ("blob", "session")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    blob: bytes
    session: SessionInfo
    def __init__(self, blob: _Optional[bytes] = ..., session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class ImportSessionRequest(_message.Message):
    __slots__ = ("blob", "session_id", "idle_ttl")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_TTL_FIELD_NUMBER: _ClassVar[int]
    blob: bytes
    session_id: str
    idle_ttl: _duration_pb2.Duration
    def __init__(self, blob: _Optional[bytes] = ..., session_id: _Optional[str] = ..., idle_ttl: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Gates(_message.Message):
    __slots__ = ("forget", "input", "output", "candidate", "c", "h")
    FORGET_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    C_FIELD_NUMBER: _ClassVar[int]
    H_FIELD_NUMBER: _ClassVar[int]
    forget: Tensor
    input: Tensor
    output: Tensor
    candidate: Tensor
    c: Tensor
    h: Tensor
    def __init__(self, forget: _Optional[_Union[Tensor, _Mapping]] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., output: _Optional[_Union[Tensor, _Mapping]] = ..., candidate: _Optional[_Union[Tensor, _Mapping]] = ..., c: _Optional[_Union[Tensor, _Mapping]] = ..., h: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
