"""`lstm-serve convert`: a source file in, a served model directory (artifact + model.toml) out, checked."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from lstm_serve.engine import files
from lstm_serve.engine.npz import load_npz, save_npz
from lstm_serve.engine.repository import CONFIG_FILE, ModelConfig, load_model, next_version
from lstm_serve.engine.weights import ModelWeights, normalization_from
from lstm_serve.errors import ModelLoadError

SOURCE_FORMATS = ("pytorch", "keras", "onnx", "npz")
TARGETS = ("numpy", "onnx")
CHECK_TOLERANCE = 1e-5


@dataclass(frozen=True)
class ConvertOptions:
    source_format: str | None = None  # None: from the file name
    backend: str = "numpy"
    name: str | None = None  # default: the output directory's name
    description: str = ""
    version: int | None = None  # None: one past the highest version in the model directory
    prefix: str | None = None  # PyTorch: the nn.LSTM's key prefix ("lstm.")
    head_prefix: str | None = None  # PyTorch: the nn.Linear's key prefix ("head.")
    input_features: tuple[str, ...] = ()
    output_features: tuple[str, ...] = ()
    normalization: dict[str, list[float]] = field(default_factory=dict)  # input_mean, input_std, output_...
    force: bool = False


def source_format(path: Path) -> str:
    name = path.name.lower()
    for suffixes, fmt in (
        ((".safetensors", ".pt", ".pth"), "pytorch"),
        ((".keras", ".weights.h5", ".h5"), "keras"),
        ((".onnx",), "onnx"),
        ((".npz",), "npz"),
    ):
        if name.endswith(suffixes):
            return fmt
    raise ModelLoadError(f"{path}: cannot tell the format from the name; pass --from {'|'.join(SOURCE_FORMATS)}")


def read_weights(path: Path, options: ConvertOptions = ConvertOptions()) -> ModelWeights:
    """The source's weights. Like every model file, the source must be a regular file (a FIFO would block the
    reader forever, a device never end) within the size limit of one model, whatever library then reads it."""
    fmt = options.source_format or source_format(path)
    files.check_file(path, None, "source file", files.MAX_MODEL_BYTES)
    if fmt == "pytorch":
        from lstm_serve.convert import pytorch

        arrays = pytorch.read_pt(path) if path.suffix in (".pt", ".pth") else pytorch.read_safetensors(path)
        return pytorch.weights_from_state_dict(arrays, options.prefix, options.head_prefix)
    if fmt == "keras":
        from lstm_serve.convert.keras import weights_from_keras

        return weights_from_keras(path)
    if fmt == "onnx":
        from lstm_serve.convert.onnx_graph import weights_from_onnx

        return weights_from_onnx(path)
    if fmt == "npz":
        return load_npz(path)
    raise ModelLoadError(f"unknown source format {fmt!r}; one of {SOURCE_FORMATS}")


def _with_metadata(weights: ModelWeights, options: ConvertOptions) -> ModelWeights:
    norm = normalization_from(options.normalization, "normalisation") or weights.normalization
    return replace(  # validate(): the same check of the metadata as every loader's (weights.check_metadata)
        weights,
        normalization=norm,
        input_features=options.input_features or weights.input_features,
        output_features=options.output_features or weights.output_features,
    ).validate()


def _toml_value(value: object) -> str:
    return json.dumps(value)  # strings, numbers and flat lists of them are valid TOML in JSON spelling


def convert(source: Path, model_dir: Path, options: ConvertOptions = ConvertOptions()) -> tuple[Path, float]:
    """Writes model_dir/VERSION/{model.npz|model.onnx, model.toml} (VERSION: options.version, or one past the highest
    version in model_dir); returns that directory and the largest difference between the written model and the
    source weights on a random sequence (it must be below CHECK_TOLERANCE)."""
    if options.backend not in TARGETS:
        raise ModelLoadError(f"unknown backend {options.backend!r}; one of {TARGETS}")
    if options.version is not None and options.version < 1:
        raise ModelLoadError(f"--version must be a positive integer, not {options.version}")
    weights = _with_metadata(read_weights(source, options), options)
    version = options.version or next_version(model_dir)
    out_dir = model_dir / str(version)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not options.force:
            raise ModelLoadError(f"{out_dir} exists and is not empty; pass --force to replace it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = options.name or model_dir.name
    lines = [
        f"# Converted by lstm-serve convert from {source.name}",
        f"name = {_toml_value(name)}",
        f"version = {version}",
        f"description = {_toml_value(options.description)}",
        f"backend = {_toml_value(options.backend)}",
    ]
    if options.backend == "numpy":
        save_npz(weights, out_dir / "model.npz")
        lines.append('weights = "model.npz"')
    else:
        from lstm_serve.convert.onnx_graph import onnx_from_weights

        onnx.save(onnx_from_weights(weights, name=name), str(out_dir / "model.onnx"))
        lines.append('weights = "model.onnx"')
        if weights.input_features:
            lines.append(f"input_features = {_toml_value(list(weights.input_features))}")
        if weights.output_features:
            lines.append(f"output_features = {_toml_value(list(weights.output_features))}")
        if weights.normalization is not None:
            n = weights.normalization
            lines.append("\n[normalization]")
            for key, arr in (("input_mean", n.input_mean), ("input_std", n.input_std)):
                lines.append(f"{key} = {_toml_value(arr.tolist())}")
            for key, arr in (("output_mean", n.output_mean), ("output_std", n.output_std)):
                lines.append(f"{key} = {_toml_value(arr.tolist())}")
    (out_dir / CONFIG_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out_dir, _check(weights, out_dir)


def _check(weights: ModelWeights, out_dir: Path) -> float:
    """Runs the written model and the source weights (NumPy cell) on the same random sequence."""
    from lstm_serve.engine.model import Model
    from lstm_serve.engine.numpy_backend import NumpyBackend

    served = load_model(out_dir, config=ModelConfig.read(out_dir, name=out_dir.parent.name, version=int(out_dir.name)))
    reference = Model.from_weights("reference", weights, NumpyBackend(weights))
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((16, weights.input_size)).astype(np.float32)
    if weights.normalization is not None:
        xs = xs * weights.normalization.input_std + weights.normalization.input_mean
    [(got, _)] = served.run_batch([xs], [served.zero_state()])
    [(want, _)] = reference.run_batch([xs], [reference.zero_state()])
    scale = 1.0 if weights.normalization is None else float(np.max(np.abs(weights.normalization.output_std)))
    error = float(np.max(np.abs(got - want))) / max(scale, 1e-12)
    if error > CHECK_TOLERANCE:
        raise ModelLoadError(f"the written model differs from the source by {error:.2e}; refusing it")
    return error
