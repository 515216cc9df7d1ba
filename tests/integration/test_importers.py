"""Every export path, converted and served by both backends, against the source framework's own numbers.

For each case: the PyTorch state_dict (.safetensors), the Keras 3 model (.keras and .weights.h5) and the two ONNX
exports (legacy and dynamo) are converted to npz (NumPy backend) and to a native-LSTM ONNX graph (ONNX backend); the
two ONNX exports are also served exactly as exported. A session streams each sequence one step at a time and must
reproduce the framework's whole-sequence output to 1e-5; Predict from the random initial state must too.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lstm_client import Client
from lstm_serve.convert import ConvertOptions, convert
from tests.frameworks import CASES, framework_io, source
from tests.servers import RunningServer, start_server, stop_server, test_settings

TOLERANCE = 1e-5
# name suffix -> (source file suffix, backend, reference output from zero state)
CONVERSIONS = {
    "pt_numpy": (".safetensors", "numpy", "torch_y0"),
    "pt_onnx": (".safetensors", "onnx", "torch_y0"),
    "keras_numpy": (".keras", "numpy", "keras_y0"),
    "keras_onnx": (".keras", "onnx", "keras_y0"),
    "kerash5_numpy": (".weights.h5", "numpy", "keras_y0"),
    "legacy_numpy": (".legacy.onnx", "numpy", "torch_y0"),
    "legacy_onnx": (".legacy.onnx", "onnx", "torch_y0"),
    "dynamo_numpy": (".dynamo.onnx", "numpy", "torch_y0"),
}
AS_EXPORTED = {"legacy_raw": ".legacy.onnx", "dynamo_raw": ".dynamo.onnx"}
MODELS = [(case, kind) for case in CASES for kind in [*CONVERSIONS, *AS_EXPORTED]]


@pytest.fixture(scope="module")
def importer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("imported")
    for case in CASES:
        for kind, (suffix, backend, _) in CONVERSIONS.items():
            convert(source(case, suffix), root / f"{case}_{kind}", ConvertOptions(backend=backend))
        for kind, suffix in AS_EXPORTED.items():
            directory = root / f"{case}_{kind}"
            directory.mkdir()
            shutil.copyfile(source(case, suffix), directory / "model.onnx")  # served only from its own directory
            (directory / "model.toml").write_text('backend = "onnx"\nweights = "model.onnx"\n')
    server, handle = start_server(test_settings(root))
    yield server
    stop_server(server, handle)


def test_every_model_loaded(importer_server: RunningServer) -> None:
    with importer_server.client() as client:
        models, failures = client.list_models_with_failures()
    assert failures == []
    assert {m.name for m in models} == {f"{case}_{kind}" for case, kind in MODELS}
    backends = {m.name: m.backend for m in models}
    assert backends["fw_l3_head_dynamo_raw"] == "onnx"
    assert backends["fw_l3_head_keras_numpy"] == "numpy"


@pytest.mark.parametrize(("case", "kind"), MODELS, ids=[f"{c}-{k}" for c, k in MODELS])
def test_streamed_steps_match_the_framework(importer_server: RunningServer, case: str, kind: str) -> None:
    io = framework_io(case)
    reference = "torch_y0" if kind in AS_EXPORTED else CONVERSIONS[kind][2]
    expected = getattr(io, reference)
    model = f"{case}_{kind}"
    with importer_server.client() as client:
        for b in range(io.x.shape[0]):
            with client.create_session(model) as session:
                got = np.stack(list(session.stream(io.x[b])))
            np.testing.assert_allclose(got, expected[b], atol=TOLERANCE, rtol=0, err_msg=f"{model} vs {reference}")
        for b in range(io.x.shape[0]):  # from PyTorch's random initial state
            p = client.predict(model, io.x[b], h0=io.h0[:, b], c0=io.c0[:, b])
            np.testing.assert_allclose(p.outputs, io.torch_y[b], atol=TOLERANCE, rtol=0)
            np.testing.assert_allclose(p.h, io.torch_hn[:, b], atol=TOLERANCE, rtol=0)
            np.testing.assert_allclose(p.c, io.torch_cn[:, b], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_the_two_backends_agree(importer_server: RunningServer, case: str) -> None:
    rng = np.random.default_rng(5)
    io = framework_io(case)
    xs = rng.standard_normal((25, io.x.shape[2])).astype(np.float32) * 2
    with importer_server.client() as client:
        numpy_out = _stream(client, f"{case}_pt_numpy", xs)
        for other in ("pt_onnx", "legacy_raw", "dynamo_raw", "keras_onnx"):
            np.testing.assert_allclose(_stream(client, f"{case}_{other}", xs), numpy_out, atol=TOLERANCE, rtol=0)


def _stream(client: Client, model: str, xs: np.ndarray) -> np.ndarray:
    with client.create_session(model) as session:
        return np.stack(list(session.stream(xs)))


def test_convert_command_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "mine"
    argv = [sys.executable, "-m", "lstm_serve.cli", "convert", str(source("fw_l3_head", ".safetensors")), str(out)]
    argv += ["--input-features", "a,b,c,d", "--output-features", "p,q", "--input-mean", "0,1,2,3"]
    argv += ["--input-std", "1,1,2,2", "--output-mean", "10,20", "--output-std", "3,4", "--description", "test"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "max difference" in result.stdout
    inspect = subprocess.run(
        [sys.executable, "-m", "lstm_serve.cli", "inspect", str(out)], capture_output=True, text=True, timeout=60
    )
    assert "input        4 features ['a', 'b', 'c', 'd']" in inspect.stdout
    assert "normalized   True" in inspect.stdout
    assert (out / "1" / "model.toml").is_file()  # a version directory: the first version of the model
    again = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr  # by default the next version
    assert "version = 2" in (out / "2" / "model.toml").read_text()
    replace = subprocess.run([*argv, "--version", "1"], capture_output=True, text=True, timeout=60)
    assert replace.returncode == 1
    assert "--force" in replace.stderr
