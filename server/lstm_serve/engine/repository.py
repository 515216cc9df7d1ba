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
fails to load is reported with the reason and skipped; the others still serve. Every file is read through
engine/files.py: regular files only, inside the model's directory, of bounded size. Clients see a short reason per
failed model (`failures`); the details, with the paths, are logged once, at load, with the model's name.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lstm_serve.engine import files
from lstm_serve.engine.forecast import parse_forecast_table
from lstm_serve.engine.model import Model, ModelInfo
from lstm_serve.engine.npz import load_npz
from lstm_serve.engine.numpy_backend import NumpyBackend
from lstm_serve.engine.onnx_backend import OnnxBackend, OnnxIO
from lstm_serve.engine.weights import ModelWeights, Normalization
from lstm_serve.errors import ModelLoadError

log = logging.getLogger(__name__)

CONFIG_FILE = "model.toml"
BACKENDS = ("numpy", "onnx")
_KEYS = {"name", "version", "description", "backend", "weights", "input_features", "output_features"}
_TABLES = {"normalization", "onnx", "forecast"}
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
    forecast: dict[str, Any] = field(default_factory=dict)  # [forecast]: checked against the model at load

    @classmethod
    def read(cls, directory: Path) -> ModelConfig:
        path = directory / CONFIG_FILE
        data = files.read_model_file(path, directory, CONFIG_FILE, files.MAX_CONFIG_BYTES)

        def error(problem: str) -> ModelLoadError:
            return ModelLoadError(f"{path}: {problem}", public=files.one_line(f"{CONFIG_FILE}: {problem}"))

        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
        try:
            raw: dict[str, Any] = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise error(f"invalid TOML: {exc}") from None
        unknown = sorted(set(raw) - _KEYS - _TABLES)
        if unknown:
            raise error(f"unknown keys {unknown}; allowed: {sorted(_KEYS | _TABLES)}")
        if "weights" not in raw:
            raise error("missing key 'weights' (the artifact file, relative to the directory)")
        if not isinstance(raw["weights"], str) or not raw["weights"]:
            raise error("'weights' must be a file name, relative to the directory")
        backend = str(raw.get("backend", "numpy"))
        if backend not in BACKENDS:
            raise error(f"unknown backend {backend!r}; available: {list(BACKENDS)}")
        onnx_table = raw.get("onnx", {})
        if set(onnx_table) - _ONNX_KEYS:
            raise error(f"unknown keys in [onnx] {sorted(set(onnx_table) - _ONNX_KEYS)}")
        forecast = raw.get("forecast", {})
        if not isinstance(forecast, dict):
            raise error("[forecast] must be a table (feedback = {input = output}, increments = {...})")
        norm = raw.get("normalization", {})
        if norm and sorted(norm) != sorted(_NORM_KEYS):
            raise error(f"[normalization] needs exactly {list(_NORM_KEYS)}, found {sorted(norm)}")
        if backend == "numpy" and (norm or onnx_table or "input_features" in raw or "output_features" in raw):
            raise error(
                "an npz model carries its normalisation and feature names itself (meta.* keys); "
                "remove them from model.toml (lstm-serve convert --input-mean ... writes them into the npz)"
            )
        return cls(
            name=str(raw.get("name", directory.name)),
            version=str(raw.get("version", "1")),
            description=str(raw.get("description", "")),
            backend=backend,
            weights=directory / raw["weights"],
            input_features=tuple(str(f) for f in raw.get("input_features", [])),
            output_features=tuple(str(f) for f in raw.get("output_features", [])),
            normalization={k: [float(v) for v in norm[k]] for k in norm},
            onnx={k: str(v) for k, v in onnx_table.items()},
            forecast=dict(forecast),
        )

    def onnx_io(self) -> OnnxIO:
        layout = self.onnx.get("layout", "batch_first")
        if layout not in ("batch_first", "seq_first"):
            raise ModelLoadError(f"[onnx] layout must be 'batch_first' or 'seq_first', not {layout!r}")
        names = {k: v for k, v in self.onnx.items() if k != "layout"}
        return OnnxIO(**names, batch_first=layout == "batch_first")


def load_model(directory: Path, onnx_threads: int = 1, config: ModelConfig | None = None) -> Model:
    """Loads the model of `directory` (with its model.toml already read into `config`, if given). Every file it
    names is confined to `directory`."""
    if config is None:
        config = ModelConfig.read(directory)
    model = _load_model(directory, onnx_threads, config)
    if config.forecast:
        i = model.info
        try:
            links = parse_forecast_table(
                config.forecast, i.input_features, i.output_features, i.input_size, i.output_size
            )
        except ModelLoadError as exc:
            path = directory / CONFIG_FILE
            public = files.one_line(f"{CONFIG_FILE}: {exc.message}")
            raise ModelLoadError(f"{path}: {exc.message}", public=public) from None
        model.info = replace(model.info, feedback=links)
    return model


def _onnx_weights(path: Path) -> ModelWeights:
    """The weights inside an ONNX graph (for the gate computation only). Imported here, when first needed: the
    converters sit above the engine."""
    from lstm_serve.convert.onnx_graph import weights_from_onnx

    return weights_from_onnx(path)


def _load_model(directory: Path, onnx_threads: int, config: ModelConfig) -> Model:
    if config.backend == "numpy":
        weights = load_npz(config.weights, directory)
        return Model.from_weights(
            config.name,
            weights,
            NumpyBackend(weights),
            version=config.version,
            description=config.description,
        )
    backend = OnnxBackend(config.weights, config.onnx_io(), threads=onnx_threads, within=directory)
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
    return Model(info, backend, norm, weights=lambda: _onnx_weights(config.weights), fingerprint=backend.fingerprint)


INTERNAL_FAILURE = "internal error while loading the model (details in the server log)"


def _has_config(entry: Path) -> bool:
    """A directory with a model.toml of any kind: one that is a FIFO or a dangling link is refused with a reason,
    not skipped in silence. An entry that cannot even be examined is logged and skipped, not fatal to the rest."""
    try:
        return entry.is_dir() and os.path.lexists(entry / CONFIG_FILE)
    except OSError as exc:
        log.error("model repository entry %s skipped: %s", entry, exc.strerror)
        return False


@dataclass(slots=True)
class Repository:
    models: dict[str, Model]
    failures: dict[str, str]  # model directory name -> why it did not load, in words fit for any client

    def _fail(self, directory: str, exc: ModelLoadError) -> None:
        """Logs the details once and keeps the short reason: clients never see the server's paths."""
        log.error("model %s not loaded: %s", directory, exc.message, extra={"model": directory})
        self.failures[directory] = files.one_line(exc.public)

    def _fail_unexpectedly(self, directory: str) -> None:
        """For an exception no loader meant to raise: its traceback goes to the log, a generic reason to clients."""
        log.exception("model %s not loaded: unexpected error", directory, extra={"model": directory})
        self.failures[directory] = INTERNAL_FAILURE

    @classmethod
    def scan(cls, root: Path, only: frozenset[str] = frozenset()) -> Repository:
        """Loads every `root/*/model.toml` (or only the directories named in `only`). No model file, however broken
        or hostile, stops the others: each failure is logged and listed, and the rest are served."""
        repo = cls(models={}, failures={})
        try:
            entries = sorted(p for p in root.iterdir() if _has_config(p))
        except OSError as exc:
            problem = "does not exist" if not root.exists() else f"cannot be read ({exc.strerror})"
            error = ModelLoadError(f"model directory {root} {problem}", public=f"the model repository {problem}")
            repo._fail(root.name or str(root), error)
            return repo
        directories = [d for d in entries if not only or d.name in only]
        configs: dict[str, ModelConfig] = {}
        for directory in directories:
            try:
                configs[directory.name] = ModelConfig.read(directory)
            except ModelLoadError as exc:
                repo._fail(directory.name, exc)
            except Exception:  # a case the reader did not foresee: still one model only
                repo._fail_unexpectedly(directory.name)
        repo._refuse_conflicts(root, [d.name for d in directories], configs)
        for directory in directories:
            config = configs.get(directory.name)
            if config is None:
                continue
            try:
                model = load_model(directory, config=config)
            except ModelLoadError as exc:
                repo._fail(directory.name, exc)
                continue
            except Exception:  # a loader bug or a case it did not foresee (MemoryError...): still one model only
                repo._fail_unexpectedly(directory.name)
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
            error = ModelLoadError(f"no {name}/{CONFIG_FILE} under {root}", public=f"no {name}/{CONFIG_FILE} found")
            repo._fail(name, error)
        return repo

    def _refuse_conflicts(self, root: Path, directories: list[str], configs: dict[str, ModelConfig]) -> None:
        """Two directories claiming one model name serve neither: whichever sorted first would otherwise win in
        silence, and clients would get another model than the one they asked for. A directory whose model.toml did
        not load claims its own name (the default), so a copy of it cannot take its place either."""
        claims: dict[str, list[str]] = defaultdict(list)
        for directory in directories:
            config = configs.get(directory)
            claims[config.name if config is not None else directory].append(directory)
        for name, claimants in claims.items():
            if len(claimants) < 2:
                continue
            for directory in claimants:
                if configs.pop(directory, None) is None:
                    continue  # already failed, with its own reason
                others = ", ".join(repr(d) for d in claimants if d != directory)
                problem = f"name conflict with directory {others}: each claims the model name {name!r}"
                self._fail(directory, ModelLoadError(f"{root / directory}: {problem}", public=problem))
