"""Keras 3 LSTM models: a `.keras` archive (config + weights) or a bare `.weights.h5`.

Keras stores kernel (I, 4H), recurrent_kernel (H, 4H) and one bias (4H,) in gate order i, f, c, o, which is
PyTorch's i, f, g, o: the conversion is two transposes, with the single bias as b_ih and b_hh = 0.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from lstm_serve.engine import files
from lstm_serve.engine.cell import LayerWeights
from lstm_serve.engine.weights import ModelWeights
from lstm_serve.errors import ModelLoadError

_MAX_CONFIG_BYTES = 16 << 20  # a Keras config.json: layer descriptions, a few kilobytes for an LSTM model
_SKIPPED = {"InputLayer", "Dropout", "SpatialDropout1D", "GaussianNoise", "Masking"}  # no-ops at inference


def weights_from_keras(path: Path) -> ModelWeights:
    try:
        if path.name.endswith(".keras"):
            with (
                files.open_model_file(path, None, "source file", files.MAX_MODEL_BYTES) as file,
                zipfile.ZipFile(file) as archive,
            ):
                config = json.loads(_member(archive, "config.json", _MAX_CONFIG_BYTES, path))
                h5_bytes = _member(archive, "model.weights.h5", files.MAX_MODEL_BYTES, path)
            return _from_h5(io.BytesIO(h5_bytes), _layer_plan(config), path)
        files.check_file(path, None, "source file", files.MAX_MODEL_BYTES)
        return _from_h5(path, None, path)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, zlib.error) as exc:  # ValueError: JSON, UTF-8
        raise ModelLoadError(f"{path}: not a readable Keras 3 file ({type(exc).__name__}: {exc})") from None


def _member(archive: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    """One member of a .keras archive, refused by the size its zip entry declares before it is inflated (a deflated
    member may declare gigabytes in a few kilobytes); the zip module stops at the declared size."""
    size = archive.getinfo(name).file_size
    if size > limit:
        raise ModelLoadError(f"{path}: {name} is {files.human(size)}; the limit is {files.human(limit)}")
    return archive.read(name)


def _layer_plan(config: dict[str, Any]) -> list[str]:
    """The layer kinds in order ("lstm" / "dense"), after checking each is one the cell computes exactly."""
    layers = config.get("config", {}).get("layers", [])
    plan = []
    for layer in layers:
        kind, cfg = layer.get("class_name"), layer.get("config", {})
        if kind in _SKIPPED:
            continue
        if kind == "LSTM":
            for key, want in (("activation", "tanh"), ("recurrent_activation", "sigmoid"), ("go_backwards", False)):
                if cfg.get(key, want) != want:
                    raise ModelLoadError(f"LSTM layer {cfg.get('name')!r} has {key}={cfg.get(key)!r}; only {want!r}")
            plan.append("lstm")
        elif kind == "Dense":
            if cfg.get("activation", "linear") != "linear":
                raise ModelLoadError(
                    f"Dense layer {cfg.get('name')!r} has activation {cfg['activation']!r}; only linear"
                )
            plan.append("dense")
        elif kind == "Bidirectional":
            raise ModelLoadError("Bidirectional layer: it needs the whole sequence and cannot be streamed")
        else:
            raise ModelLoadError(f"unsupported layer {kind} ({cfg.get('name')!r}): expected LSTM layers and one Dense")
    return plan


def _natural(name: str) -> tuple[str, int]:
    m = re.match(r"^(.*?)(?:_(\d+))?$", name)
    assert m is not None
    return m.group(1), int(m.group(2) or 0)


def _from_h5(source: Any, plan: list[str] | None, path: Path) -> ModelWeights:
    import h5py

    with h5py.File(source, "r") as h5:
        if "layers" not in h5:
            raise ModelLoadError(f"{path}: no 'layers' group: not a Keras 3 weights file (re-save with Keras 3)")
        groups = sorted(h5["layers"].keys(), key=_natural)
        lstm_names = [g for g in groups if _natural(g)[0] == "lstm"]
        dense_names = [g for g in groups if _natural(g)[0] == "dense"]
        others = [g for g in groups if g not in lstm_names + dense_names and _has_datasets(h5["layers"][g])]
        if others:
            raise ModelLoadError(f"{path}: layers other than LSTM and Dense hold weights: {others}")
        declared = _declared_bytes(h5["layers"])
        if declared > files.MAX_MODEL_BYTES:  # HDF5 may declare a huge dataset it never stored: refuse, not allocate
            raise ModelLoadError(
                f"{path}: the layers declare {files.human(declared)}; the limit is {files.human(files.MAX_MODEL_BYTES)}"
            )
        if plan is not None and (plan.count("lstm"), plan.count("dense")) != (len(lstm_names), len(dense_names)):
            raise ModelLoadError(f"{path}: the config and the weights disagree on the layers")
        if not lstm_names:
            raise ModelLoadError(f"{path}: no LSTM layer")
        if len(dense_names) > 1:
            raise ModelLoadError(f"{path}: {len(dense_names)} Dense layers; the served model has one linear head")
        layers = []
        for name in lstm_names:
            vars_ = h5["layers"][name].get("cell/vars")
            if vars_ is None or len(vars_) != 3:
                raise ModelLoadError(f"{path}: LSTM layer {name!r} has no kernel, recurrent_kernel and bias")
            kernel, recurrent, bias = (np.asarray(vars_[str(i)], dtype=np.float32) for i in range(3))
            layers.append(LayerWeights(kernel.T.copy(), recurrent.T.copy(), bias, np.zeros_like(bias)))
        head = None
        if dense_names:
            dense = h5["layers"][dense_names[0]]["vars"]
            head = (np.asarray(dense["0"], dtype=np.float32).T.copy(), np.asarray(dense["1"], dtype=np.float32))
    return ModelWeights(layers=layers, head=head).validate()


def _declared_bytes(group: Any) -> int:
    import h5py

    sizes: list[int] = []
    group.visititems(
        lambda name, obj: sizes.append(int(obj.size) * obj.dtype.itemsize) if isinstance(obj, h5py.Dataset) else None
    )
    return sum(sizes)


def _has_datasets(group: Any) -> bool:
    import h5py

    found: list[str] = []
    group.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
    return bool(found)
