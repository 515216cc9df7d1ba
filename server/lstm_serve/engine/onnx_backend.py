"""The ONNX Runtime backend: serves a graph whose inputs are the input tensor plus the recurrent state and whose
outputs are the prediction plus the new state, by default the shape of a PyTorch export:

    x [batch, seq, I], h0 [L, batch, H], c0 [L, batch, H]  ->  y [batch, seq, O], hn [L, batch, H], cn [L, batch, H]

Names and the layout of x / y are configurable (OnnxIO). At load the declared inputs and outputs are checked, sizes
are read from them, a bidirectional LSTM is refused (it cannot run one step at a time), and a sequence axis frozen by
the dynamo exporter is made symbolic again. One step = one `run` with seq = 1; ORT is pinned to one thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper

from lstm_serve.engine import files
from lstm_serve.engine.cell import F32
from lstm_serve.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OnnxIO:
    input: str = "x"
    h0: str = "h0"
    c0: str = "c0"
    output: str = "y"
    hn: str = "hn"
    cn: str = "cn"
    batch_first: bool = True  # x [batch, seq, I] and y [batch, seq, O]; False: [seq, batch, ...]


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Chosen by measurement (docs/performance.md): one intra-op thread, sequential execution, all graph
    optimisations. More threads only fight the event loop and the other compute thread for two cores."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: a warning per call would flood the log
    return options


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in value_info.type.tensor_type.shape.dim
    ]


def read_onnx(path: Path, within: Path | None = None) -> onnx.ModelProto:
    """An ONNX model with its external data, every file read through engine/files.py: regular files only, of bounded
    size. The external data must lie in `within` (the model directory), or beside the model file when no directory
    confines it (a file named on the command line), as ONNX itself requires; it is read here rather than by
    onnx.load, which would open a FIFO and block."""
    data = files.read_model_file(path, within, "weights file", files.MAX_MODEL_BYTES)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # onnx raises DecodeError and friends for truncated or foreign files
        problem = f"not a readable ONNX model ({type(exc).__name__}: {files.one_line(str(exc))})"
        raise ModelLoadError(f"{path}: {problem}", public=problem) from None
    budget = files.MAX_MODEL_BYTES - len(data)
    for tensor in external_data_helper._get_all_tensors(model):  # what onnx.load itself would load
        if external_data_helper.uses_external_data(tensor):
            budget -= _load_external(tensor, path, within if within is not None else path.parent, budget)
    return model


def _load_external(tensor: onnx.TensorProto, model_path: Path, within: Path, budget: int) -> int:
    """Reads one tensor's external data into it (as onnx.load_external_data_for_tensor does); returns its size."""
    what = "ONNX external data file"
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        location = ""
    if not location:
        problem = f"tensor {tensor.name!r} has malformed external data (location, offset, length)"
        raise ModelLoadError(f"{model_path}: {problem}", public=files.one_line(problem))
    data_path = model_path.parent / location
    with files.open_model_file(data_path, within, what, files.MAX_MODEL_BYTES) as file:
        size = os.fstat(file.fileno()).st_size
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise files.refuse(data_path, what, "shorter than the tensors it should hold", f" ({tensor.name!r})")
        if length > budget:
            raise files.refuse(data_path, what, f"over the {files.human(files.MAX_MODEL_BYTES)} limit of a model")
        file.seek(offset)
        tensor.raw_data = file.read(length)
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]
    return length


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: Path, io: OnnxIO = OnnxIO(), threads: int = 1, within: Path | None = None) -> None:
        """Loads the graph at `path`; `within` is the model directory every file must stay in."""
        self.path = path
        self.io = io
        model = read_onnx(path, within)
        try:
            self._load(model, threads)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{path}: {exc.message}", public=files.one_line(exc.public)) from None

    def _load(self, model: onnx.ModelProto, threads: int) -> None:
        io = self.io
        self.fingerprint = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()  # the graph as read
        for node in model.graph.node:
            if node.op_type == "LSTM":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                direction = attrs.get("direction", b"forward")
                direction = direction.decode() if isinstance(direction, bytes) else str(direction)
                if direction != "forward":
                    raise ModelLoadError(
                        f"LSTM node {node.name or node.output[0]!r} is {direction}; a {direction} LSTM needs "
                        "the whole sequence at once and cannot be streamed step by step"
                    )
        inputs = {i.name: i for i in model.graph.input}
        outputs = {o.name: o for o in model.graph.output}
        self.input_size, self.num_layers, self.hidden_size, self.output_size = self._check_io(model, inputs, outputs)
        self.parameters = int(sum(np.prod(init.dims) for init in model.graph.initializer))
        self._unfreeze_seq_axis(model, inputs, outputs)
        try:
            self._session = ort.InferenceSession(
                model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # unsupported op, bad graph: ORT's message names it
            raise ModelLoadError(f"ONNX Runtime cannot load the graph: {exc}") from None
        self._outputs = [io.output, io.hn, io.cn]

    def _check_io(
        self, model: onnx.ModelProto, inputs: dict[str, Any], outputs: dict[str, Any]
    ) -> tuple[int, int, int, int]:
        io = self.io
        for role, name, declared in (
            ("input", io.input, inputs),
            ("h0", io.h0, inputs),
            ("c0", io.c0, inputs),
            ("output", io.output, outputs),
            ("hn", io.hn, outputs),
            ("cn", io.cn, outputs),
        ):
            if name not in declared:
                kind = "inputs" if declared is inputs else "outputs"
                raise ModelLoadError(
                    f"the graph has no {kind[:-1]} named {name!r} (for {role}); its {kind} are "
                    f"{sorted(declared)}. Set the names under [onnx] in model.toml."
                )
            if len(_dims(declared[name])) != 3:
                raise ModelLoadError(f"{name!r} has shape {_dims(declared[name])}; expected 3 dimensions")
        x, y, h0 = _dims(inputs[io.input]), _dims(outputs[io.output]), _dims(inputs[io.h0])
        batch_axis = 0 if io.batch_first else 1
        for name, dims, axis in ((io.input, x, batch_axis), (io.h0, h0, 1), (io.c0, _dims(inputs[io.c0]), 1)):
            if isinstance(dims[axis], int):
                raise ModelLoadError(
                    f"the batch axis of {name!r} is fixed to {dims[axis]} (shape {dims}); sessions are "
                    "batched together, so export with a dynamic batch axis (dynamic_axes / dynamic_shapes)"
                )
        sizes = {"input size (x's last axis)": x[2], "layers (h0's first axis)": h0[0], "hidden size": h0[2]}
        sizes["output size (y's last axis)"] = y[2]
        for what, value in sizes.items():
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"the {what} must be a fixed number in the graph, found {value!r}")
        if _dims(inputs[io.c0]) != h0 or _dims(outputs[io.hn])[::2] != h0[::2]:
            raise ModelLoadError("h0, c0, hn and cn must have the same shape [L, batch, H]")
        return int(x[2]), int(h0[0]), int(h0[2]), int(y[2])

    def _unfreeze_seq_axis(self, model: onnx.ModelProto, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        """torch.onnx.export(dynamo=True) may declare the example's sequence length as fixed (PyTorch issue 115092),
        and ORT would then refuse seq = 1. The graph computes shapes dynamically, so making the axis symbolic again
        and re-running shape inference is enough (checked against PyTorch in the tests)."""
        seq_axis = 1 if self.io.batch_first else 0
        frozen = []
        for value_info in (inputs[self.io.input], outputs[self.io.output]):
            dim = value_info.type.tensor_type.shape.dim[seq_axis]
            if dim.HasField("dim_value") and dim.dim_value != 1:
                frozen.append(f"{value_info.name}={dim.dim_value}")
                dim.ClearField("dim_value")
                dim.dim_param = "seq"
        if frozen:
            log.warning("%s: sequence axis declared fixed (%s); made symbolic", self.path, ", ".join(frozen))
            del model.graph.value_info[:]
            inferred = onnx.shape_inference.infer_shapes(model)
            model.CopyFrom(inferred)

    def step(self, x: F32, h: F32, c: F32) -> tuple[F32, F32, F32]:
        io = self.io
        xs = x[:, None, :] if io.batch_first else x[None, :, :]
        y, hn, cn = self._session.run(
            self._outputs,
            {io.input: np.ascontiguousarray(xs), io.h0: np.ascontiguousarray(h), io.c0: np.ascontiguousarray(c)},
        )
        ys: F32 = y[:, 0] if io.batch_first else y[0]
        return ys, hn, cn
