"""ONNX graphs with native `LSTM` nodes: weights out of them (into the npz layout) and a graph built from weights.

ONNX's LSTM keeps W [1, 4H, I], R [1, 4H, H], B [1, 8H] = [Wb, Rb] in gate order i, o, f, c; the npz layout is
PyTorch's i, f, g(=c), o. Without the reorder the outputs would be wrong by ~0.5 and nothing would fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lstm_serve.engine.cell import LayerWeights
from lstm_serve.engine.onnx_backend import read_onnx
from lstm_serve.engine.weights import ModelWeights
from lstm_serve.errors import ModelLoadError

OPSET = 17
# Shape plumbing exporters put around the LSTM nodes; they carry no weights of the model.
GLUE_OPS = {
    "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Concat", "Shape", "Constant", "Identity", "Reshape",
    "Mul", "Cast", "ConstantOfShape", "Expand", "Split", "Flatten",
}  # fmt: skip
HEAD_OPS = {"MatMul", "Add", "Gemm"}
_ONNX_TO_TORCH = [0, 2, 3, 1]  # blocks i, o, f, c -> i, f, c, o
_TORCH_TO_ONNX = [0, 3, 1, 2]


def _reorder(array: np.ndarray, H: int, order: list[int]) -> np.ndarray:
    blocks = [array[i * H : (i + 1) * H] for i in range(4)]
    return np.concatenate([blocks[i] for i in order]).astype(np.float32)


def weights_from_onnx(path: Path) -> ModelWeights:
    model = read_onnx(path)  # the checks every model file passes; external data only from beside the file
    graph = model.graph
    tensors: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    unsupported = sorted({n.op_type for n in graph.node} - GLUE_OPS - HEAD_OPS - {"LSTM"})
    if unsupported:
        raise ModelLoadError(
            f"{path}: unsupported ops {unsupported}; the npz format holds LSTM layers and one linear head "
            '(serve the graph as it is with backend = "onnx" instead)'
        )
    lstm_nodes = [n for n in graph.node if n.op_type == "LSTM"]
    if not lstm_nodes:
        raise ModelLoadError(f"{path}: no LSTM node in the graph")
    layers = [_layer(node, tensors, path) for node in lstm_nodes]
    return ModelWeights(layers=layers, head=_head(graph, tensors, layers[-1].hidden_size, path)).validate()


def _layer(node: onnx.NodeProto, tensors: dict[str, np.ndarray], path: Path) -> LayerWeights:
    attrs: dict[str, Any] = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    where = f"{path}: LSTM node {node.name or node.output[0]!r}"
    direction = attrs.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction != "forward":
        raise ModelLoadError(f"{where} is {direction}; it needs the whole sequence and cannot be streamed")
    activations = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
    if activations and activations != ["Sigmoid", "Tanh", "Tanh"]:
        raise ModelLoadError(f"{where} uses activations {activations}; only Sigmoid, Tanh, Tanh")
    for unsupported in ("clip", "input_forget"):
        if attrs.get(unsupported):
            raise ModelLoadError(f"{where} sets {unsupported}, which the served cell does not compute")
    if len(node.input) > 7 and node.input[7]:
        raise ModelLoadError(f"{where} has peephole weights (input P), which the served cell does not compute")
    H = int(attrs["hidden_size"])

    def weight(index: int, what: str) -> np.ndarray:
        name = node.input[index] if len(node.input) > index else ""
        if not name:
            raise ModelLoadError(f"{where} has no {what}")
        if name not in tensors:
            raise ModelLoadError(f"{where}: {what} {name!r} is computed, not stored; cannot extract it")
        return tensors[name]

    W, R = weight(1, "W"), weight(2, "R")
    B = weight(3, "B") if len(node.input) > 3 and node.input[3] else np.zeros((1, 8 * H), np.float32)
    if W.ndim != 3 or W.shape[0] != 1 or W.shape[1] != 4 * H:
        raise ModelLoadError(f"{where}: W has shape {list(W.shape)}, expected [1, 4*{H}, I] (4 gates)")
    if R.shape != (1, 4 * H, H):
        raise ModelLoadError(f"{where}: R has shape {list(R.shape)}, expected [1, {4 * H}, {H}]")
    if B.shape != (1, 8 * H):
        raise ModelLoadError(f"{where}: B has shape {list(B.shape)}, expected [1, {8 * H}]")
    return LayerWeights(
        W_ih=_reorder(W[0], H, _ONNX_TO_TORCH),
        W_hh=_reorder(R[0], H, _ONNX_TO_TORCH),
        b_ih=_reorder(B[0, : 4 * H], H, _ONNX_TO_TORCH),
        b_hh=_reorder(B[0, 4 * H :], H, _ONNX_TO_TORCH),
    )


def _head(
    graph: onnx.GraphProto, tensors: dict[str, np.ndarray], H: int, path: Path
) -> tuple[np.ndarray, np.ndarray] | None:
    """A linear head after the last LSTM: MatMul by an (H, O) weight then Add of an (O,) bias, or one Gemm."""
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    if not matmuls:
        return None
    if len(matmuls) > 1:
        raise ModelLoadError(f"{path}: {len(matmuls)} matrix products after the LSTM; the served model has one head")
    node = matmuls[0]
    weights = [tensors[i] for i in node.input if i in tensors and tensors[i].ndim == 2]
    if len(weights) != 1:
        raise ModelLoadError(f"{path}: the head's weight must be a stored (H, O) matrix")
    W = weights[0]
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transB"):
            W = W.T
        bias = tensors.get(node.input[2]) if len(node.input) > 2 else None
    else:
        adds = [n for n in graph.node if n.op_type == "Add" and node.output[0] in n.input]
        bias = next((tensors[i] for a in adds for i in a.input if i in tensors), None)
    if W.shape[0] != H:
        raise ModelLoadError(f"{path}: the head's weight has shape {list(W.shape)}, expected ({H}, O)")
    b = np.zeros(W.shape[1], np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1)
    return np.ascontiguousarray(W.T, dtype=np.float32), b


def onnx_from_weights(weights: ModelWeights, name: str = "lstm") -> onnx.ModelProto:
    """A graph of native LSTM nodes in PyTorch's export shape: x [batch, seq, I], h0 / c0 [L, batch, H] ->
    y [batch, seq, O], hn / cn [L, batch, H]. Normalisation stays outside the graph (in model.toml)."""
    L, H, I, O = weights.num_layers, weights.hidden_size, weights.input_size, weights.output_size
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [helper.make_node("Transpose", ["x"], ["x_seq_first"], perm=[1, 0, 2])]
    layer_input = "x_seq_first"
    for k, lw in enumerate(weights.layers):
        W = _reorder(lw.W_ih, H, _TORCH_TO_ONNX)[None]
        R = _reorder(lw.W_hh, H, _TORCH_TO_ONNX)[None]
        B = np.concatenate([_reorder(lw.b_ih, H, _TORCH_TO_ONNX), _reorder(lw.b_hh, H, _TORCH_TO_ONNX)])[None]
        inits += [numpy_helper.from_array(a, f"{n}_{k}") for a, n in ((W, "W"), (R, "R"), (B, "B"))]
        inits += [numpy_helper.from_array(np.array([k], np.int64), f"start_{k}")]
        inits += [numpy_helper.from_array(np.array([k + 1], np.int64), f"end_{k}")]
        nodes += [
            helper.make_node("Slice", [state, f"start_{k}", f"end_{k}"], [f"{state}_{k}"]) for state in ("h0", "c0")
        ]
        nodes.append(
            helper.make_node(
                "LSTM",
                [layer_input, f"W_{k}", f"R_{k}", f"B_{k}", "", f"h0_{k}", f"c0_{k}"],
                [f"Y_{k}", f"hn_{k}", f"cn_{k}"],
                hidden_size=H,
                name=f"lstm_{k}",
            )
        )
        nodes.append(helper.make_node("Squeeze", [f"Y_{k}", "axis1"], [f"seq_{k}"]))
        layer_input = f"seq_{k}"
    for out in ("hn", "cn"):
        nodes.append(helper.make_node("Concat", [f"{out}_{k}" for k in range(L)], [out], axis=0))
    nodes.append(helper.make_node("Transpose", [layer_input], ["top"], perm=[1, 0, 2]))
    if weights.head is None:
        nodes.append(helper.make_node("Identity", ["top"], ["y"]))
    else:
        inits += [numpy_helper.from_array(np.ascontiguousarray(weights.head[0].T, np.float32), "head_W")]
        inits += [numpy_helper.from_array(weights.head[1].astype(np.float32), "head_b")]
        nodes += [
            helper.make_node("MatMul", ["top", "head_W"], ["head_out"]),
            helper.make_node("Add", ["head_out", "head_b"], ["y"]),
        ]

    def value(name: str, shape: list[int | str]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    graph = helper.make_graph(
        nodes,
        name,
        [value("x", ["batch", "seq", I]), value("h0", [L, "batch", H]), value("c0", [L, "batch", H])],
        [value("y", ["batch", "seq", O]), value("hn", [L, "batch", H]), value("cn", [L, "batch", H])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lstm-serve")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
