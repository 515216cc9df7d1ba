"""Broken or unservable models are refused at load or convert time, with a message that names the problem."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from lstm_serve.convert import ConvertOptions, convert, read_weights
from lstm_serve.convert.onnx_graph import onnx_from_weights
from lstm_serve.engine.npz import load_npz
from lstm_serve.engine.onnx_backend import OnnxBackend, OnnxIO
from lstm_serve.engine.repository import Repository
from lstm_serve.errors import ModelLoadError
from tests.frameworks import source
from tests.golden import FIXTURES


def _graph() -> onnx.ModelProto:
    return onnx_from_weights(load_npz(FIXTURES / "golden_l3_head.npz"))


def _save(tmp_path: Path, model: onnx.ModelProto, name: str = "m.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def _wrong_gate_count(m: onnx.ModelProto) -> None:
    _set_init(m, "W_0", _init(m, "W_0")[:, :24])  # 3 gates of H = 8


def _nan_weight(m: onnx.ModelProto) -> None:
    w = _init(m, "R_1").copy()
    w[0, 5, 2] = np.nan
    _set_init(m, "R_1", w)


def _mismatched_sizes(m: onnx.ModelProto) -> None:
    _set_init(m, "W_1", np.zeros((1, 32, 5), np.float32))  # layer 1 should take H = 8 inputs


def _extra_op(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("Relu", ["y"], ["y_relu"]))


def _peephole(m: onnx.ModelProto) -> None:
    node = next(n for n in m.graph.node if n.op_type == "LSTM")
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 24), np.float32), "P"))
    node.input.append("P")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_wrong_gate_count, "W has shape [1, 24, 4], expected [1, 4*8, I] (4 gates)"),
        (_nan_weight, "lstm.1.W_hh contains NaN or Inf"),
        (_mismatched_sizes, "lstm.1.W_ih has shape (32, 5), expected (32, 8)"),
        (_extra_op, "unsupported ops ['Relu']"),
        (_peephole, "peephole"),
    ],
)
def test_onnx_import_refuses(tmp_path: Path, edit: Callable[[onnx.ModelProto], None], message: str) -> None:
    model = _graph()
    edit(model)
    with pytest.raises(ModelLoadError) as err:
        read_weights(_save(tmp_path, model))
    assert message in str(err.value)


def test_bidirectional_is_refused_everywhere(tmp_path: Path) -> None:
    for path in (source("bidir", ".onnx"), source("bidir", ".safetensors")):
        with pytest.raises(ModelLoadError, match=r"bidirectional.*cannot be streamed"):
            read_weights(path)
    with pytest.raises(ModelLoadError, match="bidirectional"):
        OnnxBackend(source("bidir", ".onnx"))


def test_truncated_files(tmp_path: Path) -> None:
    for name in ("fw_l3_head.legacy.onnx", "fw_l3_head.safetensors", "fw_l3_head.keras"):
        data = (source("", name)).read_bytes()
        cut = tmp_path / name
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ModelLoadError, match="not a readable"):
            read_weights(cut)
    with pytest.raises(ModelLoadError, match="not a readable ONNX model"):
        OnnxBackend(tmp_path / "fw_l3_head.legacy.onnx")


def test_pt_without_torch_says_what_to_do() -> None:
    try:
        import torch  # noqa: F401

        pytest.skip("torch is installed here; the message is for machines without it")
    except ImportError:
        pass
    with pytest.raises(ModelLoadError, match=r"needs PyTorch .* save the state_dict as safetensors"):
        read_weights(source("fw_l3_head", ".pt"))


def test_keras_layers_the_cell_does_not_compute(tmp_path: Path) -> None:
    with zipfile.ZipFile(source("fw_l3_head", ".keras")) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    config["config"]["layers"][1]["config"]["recurrent_activation"] = "hard_sigmoid"
    files["config.json"] = json.dumps(config).encode()
    bad = tmp_path / "hard.keras"
    with zipfile.ZipFile(bad, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    with pytest.raises(ModelLoadError, match="recurrent_activation='hard_sigmoid'; only 'sigmoid'"):
        read_weights(bad)


def test_onnx_backend_checks_the_declared_io(tmp_path: Path) -> None:
    path = _save(tmp_path, _graph())
    with pytest.raises(
        ModelLoadError, match=r"no input named 'input' \(for input\); its inputs are \['c0', 'h0', 'x'\]"
    ):
        OnnxBackend(path, OnnxIO(input="input"))
    fixed = _graph()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4  # batch axis fixed by the export
    with pytest.raises(ModelLoadError, match="batch axis of 'x' is fixed to 4"):
        OnnxBackend(_save(tmp_path, fixed, "fixed.onnx"))
    backend = OnnxBackend(path)
    assert (backend.input_size, backend.num_layers, backend.hidden_size, backend.output_size) == (4, 3, 8, 2)


def test_dynamo_export_with_frozen_sequence_axis_is_repaired() -> None:
    declared = onnx.load(str(source("fw_l3_head", ".dynamo.onnx"))).graph.input[0].type.tensor_type.shape.dim[1]
    assert declared.dim_value == 13  # what the exporter wrote
    backend = OnnxBackend(source("fw_l3_head", ".dynamo.onnx"))
    x = np.zeros((2, 4), np.float32)
    h = np.zeros((3, 2, 7), np.float32)
    y, hn, _ = backend.step(x, h, h)  # one step: seq = 1, which the frozen declaration would refuse
    assert (y.shape, hn.shape) == ((2, 2), (3, 2, 7))


def test_broken_onnx_model_does_not_stop_the_others(tmp_path: Path) -> None:
    good = tmp_path / "good"
    convert(source("fw_l1_nohead", ".safetensors"), good, ConvertOptions(backend="onnx"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.onnx").write_bytes(b"\x08\x07garbage")
    (bad / "model.toml").write_text('backend = "onnx"\nweights = "model.onnx"\n')
    names = tmp_path / "names"
    names.mkdir()
    shutil.copyfile(good / "1" / "model.onnx", names / "model.onnx")  # a model serves only files in its directory
    (names / "model.toml").write_text('backend = "onnx"\nweights = "model.onnx"\ninput_features = ["only_one"]\n')
    repo = Repository.scan(tmp_path)
    assert list(repo.models) == ["good"]
    assert "not a readable ONNX model" in repo.failures["bad"]
    assert "1 input feature names for input_size 3" in repo.failures["names"]


def test_npz_models_keep_their_metadata_in_the_npz(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.toml").write_text(f'weights = "{FIXTURES / "golden_l3_head.npz"}"\ninput_features = ["a"]\n')
    repo = Repository.scan(tmp_path)
    assert "carries its normalisation and feature names itself" in repo.failures["m"]
