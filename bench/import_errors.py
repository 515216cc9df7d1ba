"""Largest difference between each import path, served by each backend, and the source framework's own outputs.

    python -m bench.import_errors

Runs the committed framework fixtures (tests/fixtures/frameworks) through `convert` and the engine, one time step
at a time from a zero state (as a session does), and compares with the framework's whole-sequence output.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from lstm_serve.convert import ConvertOptions, convert
from lstm_serve.engine.model import Model
from lstm_serve.engine.repository import load_model
from tests.frameworks import CASES, framework_io, source

PATHS = {  # path name -> (source suffix, framework output to compare with)
    "PyTorch .safetensors": (".safetensors", "torch_y0"),
    "Keras .keras": (".keras", "keras_y0"),
    "Keras .weights.h5": (".weights.h5", "keras_y0"),
    "ONNX legacy export": (".legacy.onnx", "torch_y0"),
    "ONNX dynamo export": (".dynamo.onnx", "torch_y0"),
}


def _stepwise(model: Model, x: np.ndarray) -> np.ndarray:
    state, ys = model.zero_state(), []
    for t in range(len(x)):
        [(y, state)] = model.run_batch([x[t : t + 1]], [state])
        ys.append(y[0])
    return np.stack(ys)


def max_errors() -> list[tuple[str, str, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path_name, (suffix, reference) in PATHS.items():
            for backend in ("numpy", "onnx"):
                worst = 0.0
                for case in CASES:
                    io = framework_io(case)
                    out = Path(tmp) / f"{case}{suffix}-{backend}".replace(".", "_")
                    convert(source(case, suffix), out, ConvertOptions(backend=backend))
                    model = load_model(out)
                    for b in range(io.x.shape[0]):
                        got = _stepwise(model, io.x[b])
                        worst = max(worst, float(np.abs(got - getattr(io, reference)[b]).max()))
                rows.append((path_name, backend, worst))
        for kind in ("legacy", "dynamo"):  # the export itself on the ONNX backend, no conversion
            worst = 0.0
            for case in CASES:
                io = framework_io(case)
                out = Path(tmp) / f"{case}-{kind}-raw"
                out.mkdir()
                shutil.copyfile(source(case, f".{kind}.onnx"), out / "model.onnx")  # served only from its directory
                (out / "model.toml").write_text('backend = "onnx"\nweights = "model.onnx"\n')
                model = load_model(out)
                for b in range(io.x.shape[0]):
                    worst = max(worst, float(np.abs(_stepwise(model, io.x[b]) - io.torch_y0[b]).max()))
            rows.append((f"ONNX {kind} export, served as exported", "onnx", worst))
    return rows


if __name__ == "__main__":
    print("| import path | backend | max abs difference from the framework |")
    print("| --- | --- | --- |")
    for name, backend, error in max_errors():
        print(f"| {name} | {backend} | {error:.1e} |")
