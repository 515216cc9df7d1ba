"""The model repository: one directory per model, each with a model.toml beside its artifact.

    models/elnino/model.toml:                     models/macro/model.toml:
        version = "1"                                 backend = "onnx"
        description = "..."                           weights = "model.onnx"
        backend = "numpy"      # the default          input_features = ["unemp", "infl", ...]
        weights = "elnino.npz"                        [normalization]
                                                      input_mean = [...]   # input_std, output_mean, output_std
                                                      [onnx]               # only if not PyTorch's export names
                                                      input = "x"          # h0, c0, output, hn, cn, layout

An npz carries its own normalisation and feature names; an ONNX graph does not, so model.toml does. A model that
fails to load is reported with the reason and skipped; the others still serve.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lstm_serve.engine.model import Model, ModelInfo
from lstm_serve.engine.npz import load_npz
from lstm_serve.engine.numpy_backend import NumpyBackend
from lstm_serve.engine.onnx_backend import OnnxBackend, OnnxIO
from lstm_serve.engine.weights import Normalization
from lstm_serve.errors import ModelLoadError

log = logging.getLogger(__name__)

CONFIG_FILE = "model.toml"
BACKENDS = ("numpy", "onnx")
_KEYS = {"name", "version", "description", "backend", "weights", "input_features", "output_features"}
_TABLES = {"normalization", "onnx"}
_NORM_KEYS = ("input_mean", "input_std", "output_mean", "output_std")
_ONNX_KEYS = {"input", "h0", "c0", "output", "hn", "cn", "layout"}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    version: str
    description: str
    backend: str
    weights: Path
    input_features: tuple[str, ...] = ()
    output_features: tuple[str, ...] = ()
    normalization: dict[str, list[float]] = field(default_factory=dict)
    onnx: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, directory: Path) -> ModelConfig:
        path = directory / CONFIG_FILE
        try:
            raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
        unknown = sorted(set(raw) - _KEYS - _TABLES)
        if unknown:
            raise ModelLoadError(f"{path}: unknown keys {unknown}; allowed: {sorted(_KEYS | _TABLES)}")
        if "weights" not in raw:
            raise ModelLoadError(f"{path}: missing key 'weights' (the artifact file, relative to the directory)")
        backend = str(raw.get("backend", "numpy"))
        if backend not in BACKENDS:
            raise ModelLoadError(f"{path}: unknown backend {backend!r}; available: {list(BACKENDS)}")
        onnx_table = raw.get("onnx", {})
        if set(onnx_table) - _ONNX_KEYS:
            raise ModelLoadError(f"{path}: unknown keys in [onnx] {sorted(set(onnx_table) - _ONNX_KEYS)}")
        norm = raw.get("normalization", {})
        if norm and sorted(norm) != sorted(_NORM_KEYS):
            raise ModelLoadError(f"{path}: [normalization] needs exactly {list(_NORM_KEYS)}, found {sorted(norm)}")
        if backend == "numpy" and (norm or onnx_table or "input_features" in raw or "output_features" in raw):
            raise ModelLoadError(
                f"{path}: an npz model carries its normalisation and feature names itself (meta.* keys); "
                "remove them from model.toml (lstm-serve convert --input-mean ... writes them into the npz)"
            )
        return cls(
            name=str(raw.get("name", directory.name)),
            version=str(raw.get("version", "1")),
            description=str(raw.get("description", "")),
            backend=backend,
            weights=directory / str(raw["weights"]),
            input_features=tuple(str(f) for f in raw.get("input_features", [])),
            output_features=tuple(str(f) for f in raw.get("output_features", [])),
            normalization={k: [float(v) for v in norm[k]] for k in norm},
            onnx={k: str(v) for k, v in onnx_table.items()},
        )

    def onnx_io(self) -> OnnxIO:
        layout = self.onnx.get("layout", "batch_first")
        if layout not in ("batch_first", "seq_first"):
            raise ModelLoadError(f"[onnx] layout must be 'batch_first' or 'seq_first', not {layout!r}")
        names = {k: v for k, v in self.onnx.items() if k != "layout"}
        return OnnxIO(**names, batch_first=layout == "batch_first")


def load_model(directory: Path, onnx_threads: int = 1) -> Model:
    config = ModelConfig.read(directory)
    if config.backend == "numpy":
        weights = load_npz(config.weights)
        return Model.from_weights(
            config.name,
            weights,
            NumpyBackend(weights),
            version=config.version,
            description=config.description,
        )
    try:
        backend = OnnxBackend(config.weights, config.onnx_io(), threads=onnx_threads)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{directory.name}: {exc.message}") from None
    norm = None
    if config.normalization:
        n = config.normalization
        norm = Normalization(*(np.asarray(n[k], np.float32) for k in _NORM_KEYS))
        for key, size in (("input", backend.input_size), ("output", backend.output_size)):
            for stat in ("mean", "std"):
                if len(n[f"{key}_{stat}"]) != size:
                    raise ModelLoadError(
                        f"[normalization] {key}_{stat} has {len(n[f'{key}_{stat}'])} values, need {size}"
                    )
        if min(min(n["input_std"]), min(n["output_std"])) <= 0:
            raise ModelLoadError("[normalization] std values must be > 0")
    for what, names, size in (
        ("input_features", config.input_features, backend.input_size),
        ("output_features", config.output_features, backend.output_size),
    ):
        if names and len(names) != size:
            raise ModelLoadError(f"{what} has {len(names)} names for {size} values")
    info = ModelInfo(
        name=config.name,
        version=config.version,
        description=config.description,
        backend=backend.name,
        input_size=backend.input_size,
        hidden_size=backend.hidden_size,
        num_layers=backend.num_layers,
        output_size=backend.output_size,
        input_features=config.input_features,
        output_features=config.output_features,
        normalized=norm is not None,
        parameters=backend.parameters,
    )
    return Model(info, backend, norm)


@dataclass(slots=True)
class Repository:
    models: dict[str, Model]
    failures: dict[str, str]  # model directory name -> why it did not load

    @classmethod
    def scan(cls, root: Path, only: frozenset[str] = frozenset()) -> Repository:
        """Loads every `root/*/model.toml` (or only the directories named in `only`)."""
        repo = cls(models={}, failures={})
        if not root.is_dir():
            repo.failures[str(root)] = f"model directory {root} does not exist"
            return repo
        for directory in sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file()):
            if only and directory.name not in only:
                continue
            try:
                model = load_model(directory)
            except ModelLoadError as exc:
                log.error("model %s not loaded: %s", directory.name, exc.message, extra={"model": directory.name})
                repo.failures[directory.name] = exc.message
                continue
            if model.info.name in repo.models:
                repo.failures[directory.name] = f"duplicate model name {model.info.name!r}"
                continue
            repo.models[model.info.name] = model
            i = model.info
            log.info(
                "model %s loaded: %s backend, %d inputs -> %d x LSTM(%d) -> %d outputs%s",
                i.name,
                i.backend,
                i.input_size,
                i.num_layers,
                i.hidden_size,
                i.output_size,
                ", normalised" if i.normalized else "",
                extra={"model": i.name},
            )
        for name in sorted(only - set(repo.models) - set(repo.failures)):
            repo.failures[name] = f"no {name}/{CONFIG_FILE} under {root}"
        return repo
