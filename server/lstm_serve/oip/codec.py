"""Open Inference Protocol messages <-> the data plane's arrays, and the request parameters that drive a sequence.

The protocol's tensors carry a batch dimension; lstm-serve runs one sequence per request, as Triton's sequence
batcher does, so the batch is always 1: an input of shape [1, I] is one time step, [1, T, I] is T of them, and the
output has the same layout ([1, O] or [1, T, O]). Outputs travel as raw little-endian bytes (raw_output_contents),
which is where tritonclient reads them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from lstm_serve import __version__
from lstm_serve._proto.inference import grpc_service_pb2 as pb
from lstm_serve.dataplane import F32, ModelInfo
from lstm_serve.errors import InvalidInput

INPUT = "INPUT"
OUTPUT = "OUTPUT"
DATATYPE = "FP32"
SERVER_NAME = "lstm-serve"
EXTENSIONS = ("sequence",)  # sequence_id / sequence_start / sequence_end, over ModelInfer and ModelStreamInfer

# The request parameters read here. Triton's three, and lstm-serve's own: the sequence number of this request, which
# makes a resend of the request an exactly-once retry (its stored reply is replayed instead of applying it again).
SEQUENCE_ID = "sequence_id"
SEQUENCE_START = "sequence_start"
SEQUENCE_END = "sequence_end"
LSTM_SEQ = "lstm_seq"
# Asked for by tritonclient's async_stream_infer(enable_empty_final_response=True): it then reads this flag on each
# response. Every lstm-serve request has exactly one response, which is therefore final.
ENABLE_FINAL_FLAG = "triton_enable_empty_final_response"
FINAL_FLAG = "triton_final_response"

# OIP sequences live among the lstm.v1 sessions under this prefix, one namespace per model (as Triton's sequence ids
# are per model): sequence 7 of model "elnino" is the session "oip:elnino:7", which lstm.v1 can also read by that id.
SESSION_PREFIX = "oip"
_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_UINT64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SequenceControl:
    """The sequence parameters of one request."""

    sequence_id: str  # as text: uint64 42 and string "42" name the same sequence
    start: bool
    end: bool
    seq: int | None  # lstm_seq, when the caller gave it


def _value(request: pb.ModelInferRequest, name: str) -> bool | int | str | float | None:
    if name not in request.parameters:
        return None
    param = request.parameters[name]
    choice = param.WhichOneof("parameter_choice")
    if choice is None:
        return None
    value: bool | int | str | float = getattr(param, choice)
    return value


def _flag(request: pb.ModelInferRequest, name: str) -> bool:
    value = _value(request, name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter {name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def sequence_control(request: pb.ModelInferRequest) -> SequenceControl | None:
    """The request's sequence parameters, or None for a stateless request (no sequence_id, or 0, or "")."""
    raw_id = _value(request, SEQUENCE_ID)
    start, end = _flag(request, SEQUENCE_START), _flag(request, SEQUENCE_END)
    seq = _value(request, LSTM_SEQ)
    if isinstance(raw_id, (bool, float)):
        raise InvalidInput(f"parameter {SEQUENCE_ID} must be an unsigned integer or a string, got {raw_id!r}")
    if raw_id is None or raw_id == 0 or raw_id == "":
        if start or end or seq is not None:
            raise InvalidInput(
                f"parameters {SEQUENCE_START}, {SEQUENCE_END} and {LSTM_SEQ} need a {SEQUENCE_ID} (non-zero integer or "
                "non-empty string): without one a request is stateless"
            )
        return None
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 1):
        raise InvalidInput(f"parameter {LSTM_SEQ} must be an integer >= 1 (this request's sequence number), got {seq}")
    # Triton reads an int64 sequence_id as the uint64 of the same bits (tritonclient sends ids as int64)
    text = str(raw_id & _UINT64) if isinstance(raw_id, int) else raw_id
    return SequenceControl(text, start, end, seq)


def session_id(model: str, sequence_id: str) -> str:
    """The lstm-serve session of a model's OIP sequence."""
    sid = f"{SESSION_PREFIX}:{model}:{sequence_id}"
    if not _SESSION_ID.fullmatch(sid):
        room = 128 - len(sid) + len(sequence_id)
        raise InvalidInput(
            f"a string {SEQUENCE_ID} must be 1-{room} characters of [A-Za-z0-9._:-] for model {model!r} "
            f"(it names the session {SESSION_PREFIX}:{model}:<sequence_id>); use another id, or an integer"
        )
    return sid


def decode_input(request: pb.ModelInferRequest, info: ModelInfo) -> tuple[F32, bool]:
    """The request's input as (T, I) float32, and whether it had a time axis ([1, T, I] rather than [1, I])."""
    expected = f"{INPUT!r} ({DATATYPE}, shape [1, {info.input_size}] or [1, T, {info.input_size}])"
    if len(request.inputs) != 1:
        raise InvalidInput(f"model {info.name!r} takes one input tensor, {expected}; got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != INPUT:
        raise InvalidInput(f"unknown input {tensor.name[:64]!r}: model {info.name!r} takes one tensor, {expected}")
    if tensor.datatype != DATATYPE:
        raise InvalidInput(f"input {INPUT!r} must be {DATATYPE}, got {tensor.datatype[:16]!r}")
    shape = list(tensor.shape)
    if len(shape) not in (2, 3) or shape[0] != 1 or shape[-1] != info.input_size or any(d < 0 for d in shape):
        raise InvalidInput(f"input {INPUT!r} has shape {shape[:8]}; model {info.name!r} takes {expected}")
    count = math.prod(shape)
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1 or tensor.HasField("contents"):
            raise InvalidInput(
                f"give the data of input {INPUT!r} once: one raw_input_contents entry, or contents.fp32_contents; "
                f"got {len(raw)} raw entries{' and contents' if tensor.HasField('contents') else ''}"
            )
        if len(raw[0]) != 4 * count:
            raise InvalidInput(
                f"input {INPUT!r} of shape {shape} needs {4 * count} bytes of raw FP32 data, got {len(raw[0])}"
            )
        values = np.frombuffer(raw[0], dtype="<f4")
    else:
        typed = tensor.contents.fp32_contents
        if len(typed) != count:
            raise InvalidInput(
                f"input {INPUT!r} of shape {shape} needs {count} values in contents.fp32_contents "
                f"(or its bytes in raw_input_contents), got {len(typed)}"
            )
        values = np.asarray(typed, dtype=np.float32)
    return values.astype(np.float32, copy=False).reshape(-1, info.input_size), len(shape) == 3


def check_outputs(request: pb.ModelInferRequest, info: ModelInfo) -> None:
    """Requested outputs, if any, must name the model's one output (their parameters are ignored)."""
    for wanted in request.outputs:
        if wanted.name != OUTPUT:
            raise InvalidInput(
                f"unknown output {wanted.name[:64]!r}: model {info.name!r} has one output tensor, {OUTPUT!r}"
            )


def infer_response(
    request: pb.ModelInferRequest, info: ModelInfo, outputs: F32, timed: bool, seq: int | None
) -> pb.ModelInferResponse:
    """outputs: (T, O). `seq`: the sequence number the request was applied as (None: stateless)."""
    ys = np.ascontiguousarray(outputs, dtype="<f4").reshape(-1, info.output_size)
    shape = [1, *ys.shape] if timed else [1, info.output_size]
    reply = pb.ModelInferResponse(
        model_name=info.name,
        model_version=str(info.version),
        id=request.id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype=DATATYPE, shape=shape)],
        raw_output_contents=[ys.tobytes()],
    )
    if seq is not None:
        reply.parameters[LSTM_SEQ].int64_param = seq
    if _value(request, ENABLE_FINAL_FLAG) is True:
        reply.parameters[FINAL_FLAG].bool_param = True
    return reply


def model_metadata(info: ModelInfo) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=info.name,
        versions=[str(info.version)],
        platform=f"lstm-serve_{info.backend}",
        inputs=[tensor(name=INPUT, datatype=DATATYPE, shape=[1, -1, info.input_size])],
        outputs=[tensor(name=OUTPUT, datatype=DATATYPE, shape=[1, -1, info.output_size])],
    )


def server_metadata() -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)
