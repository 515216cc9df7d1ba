"""The model repository: one directory per model, each with a model.toml beside its artifact.

    models/elnino/model.toml:
        version = "1"
        description = "..."
        backend = "numpy"          # optional, the default
        weights = "elnino.npz"

A model that fails to load is reported with the reason and skipped; the others still serve.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lstm_serve.engine.backend import Backend
from lstm_serve.engine.model import Model
from lstm_serve.engine.npz import load_npz
from lstm_serve.engine.numpy_backend import NumpyBackend
from lstm_serve.engine.weights import ModelWeights
from lstm_serve.errors import ModelLoadError

log = logging.getLogger(__name__)

CONFIG_FILE = "model.toml"
_KEYS = {"name", "version", "description", "backend", "weights"}
_BACKENDS = {"numpy": NumpyBackend}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    version: str
    description: str
    backend: str
    weights: Path

    @classmethod
    def read(cls, directory: Path) -> ModelConfig:
        path = directory / CONFIG_FILE
        try:
            raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise ModelLoadError(f"{path}: unknown keys {unknown}; allowed: {sorted(_KEYS)}")
        if "weights" not in raw:
            raise ModelLoadError(f"{path}: missing key 'weights' (the artifact file, relative to the directory)")
        backend = str(raw.get("backend", "numpy"))
        if backend not in _BACKENDS:
            raise ModelLoadError(f"{path}: unknown backend {backend!r}; available: {sorted(_BACKENDS)}")
        return cls(
            name=str(raw.get("name", directory.name)),
            version=str(raw.get("version", "1")),
            description=str(raw.get("description", "")),
            backend=backend,
            weights=directory / str(raw["weights"]),
        )


def make_backend(kind: str, weights: ModelWeights) -> Backend:
    return _BACKENDS[kind](weights)


def load_model(directory: Path) -> Model:
    config = ModelConfig.read(directory)
    weights = load_npz(config.weights)
    return Model.from_weights(
        config.name,
        weights,
        make_backend(config.backend, weights),
        version=config.version,
        description=config.description,
    )


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
                log.error("model %s not loaded: %s", directory.name, exc.message)
                repo.failures[directory.name] = exc.message
                continue
            if model.info.name in repo.models:
                repo.failures[directory.name] = f"duplicate model name {model.info.name!r}"
                continue
            repo.models[model.info.name] = model
            log.info("model %s loaded: %s", model.info.name, model.info)
        for name in sorted(only - set(repo.models) - set(repo.failures)):
            repo.failures[name] = f"no {name}/{CONFIG_FILE} under {root}"
        return repo
