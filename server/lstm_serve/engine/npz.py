"""The npz model format, version 1 (docs/model-format.md): PyTorch layout and gate order, no pickles.

meta.format_version      int, = 1
lstm.{k}.W_ih            (4H, I_k)  gate blocks i, f, g, o;  I_0 = input size, I_k = H above
lstm.{k}.W_hh            (4H, H)
lstm.{k}.b_ih, b_hh      (4H,)
head.W, head.b           (O, H), (O,)            optional, both or neither
meta.input_mean/std      (I,)                    optional, all four or none
meta.output_mean/std     (O,)
meta.input_features      (I,) strings            optional
meta.output_features     (O,) strings            optional
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from lstm_serve.engine.cell import F32, LayerWeights
from lstm_serve.engine.weights import ModelWeights, Normalization
from lstm_serve.errors import ModelLoadError

FORMAT_VERSION = 1
_LAYER_KEY = re.compile(r"^lstm\.(\d+)\.(W_ih|W_hh|b_ih|b_hh)$")
_NORM_KEYS = ("meta.input_mean", "meta.input_std", "meta.output_mean", "meta.output_std")
_OTHER_KEYS = {"meta.format_version", "head.W", "head.b", "meta.input_features", "meta.output_features", *_NORM_KEYS}


def load_npz(path: Path) -> ModelWeights:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ModelLoadError(f"{path}: not a readable npz file ({exc})") from None
    try:
        return weights_from_arrays(arrays)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc.message}") from None


def weights_from_arrays(arrays: dict[str, np.ndarray]) -> ModelWeights:
    if "meta.format_version" not in arrays:
        raise ModelLoadError("missing key meta.format_version")
    version = arrays["meta.format_version"]
    if version.shape != () or not np.issubdtype(version.dtype, np.integer) or int(version) != FORMAT_VERSION:
        raise ModelLoadError(f"unknown format version {version!r}; this server reads version {FORMAT_VERSION}")

    unknown = sorted(k for k in arrays if k not in _OTHER_KEYS and not _LAYER_KEY.match(k))
    if unknown:
        raise ModelLoadError(f"unknown keys {unknown}")

    layer_ids = sorted({int(m.group(1)) for k in arrays if (m := _LAYER_KEY.match(k))})
    if not layer_ids:
        raise ModelLoadError("missing key lstm.0.W_ih: the file has no LSTM layer")
    if layer_ids != list(range(len(layer_ids))):
        raise ModelLoadError(f"layers must be numbered 0..L-1, found {layer_ids}")

    def get(key: str) -> F32:
        if key not in arrays:
            raise ModelLoadError(f"missing key {key}")
        arr = arrays[key]
        if not np.issubdtype(arr.dtype, np.floating):
            raise ModelLoadError(f"{key} has dtype {arr.dtype}, expected a float type")
        return arr.astype(np.float32)

    layers = [
        LayerWeights(get(f"lstm.{k}.W_ih"), get(f"lstm.{k}.W_hh"), get(f"lstm.{k}.b_ih"), get(f"lstm.{k}.b_hh"))
        for k in layer_ids
    ]
    head = None
    if "head.W" in arrays or "head.b" in arrays:
        head = (get("head.W"), get("head.b"))
    norm = None
    present = [k for k in _NORM_KEYS if k in arrays]
    if present:
        if len(present) != len(_NORM_KEYS):
            missing = sorted(set(_NORM_KEYS) - set(present))
            raise ModelLoadError(f"normalization needs all four meta.*_mean/std keys; missing {missing}")
        norm = Normalization(*(get(k) for k in _NORM_KEYS))
    return ModelWeights(
        layers=layers,
        head=head,
        normalization=norm,
        input_features=_strings(arrays, "meta.input_features"),
        output_features=_strings(arrays, "meta.output_features"),
    ).validate()


def _strings(arrays: dict[str, np.ndarray], key: str) -> tuple[str, ...]:
    if key not in arrays:
        return ()
    arr = arrays[key]
    if arr.dtype.kind != "U" or arr.ndim != 1:
        raise ModelLoadError(f"{key} must be a 1-D array of strings")
    return tuple(str(s) for s in arr)


def weights_to_arrays(weights: ModelWeights) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {"meta.format_version": np.array(FORMAT_VERSION, dtype=np.int64)}
    for k, lw in enumerate(weights.layers):
        arrays |= {f"lstm.{k}.W_ih": lw.W_ih, f"lstm.{k}.W_hh": lw.W_hh, f"lstm.{k}.b_ih": lw.b_ih}
        arrays[f"lstm.{k}.b_hh"] = lw.b_hh
    if weights.head is not None:
        arrays["head.W"], arrays["head.b"] = weights.head
    if weights.normalization is not None:
        norm = weights.normalization
        values = (norm.input_mean, norm.input_std, norm.output_mean, norm.output_std)
        arrays |= dict(zip(_NORM_KEYS, values, strict=True))
    if weights.input_features:
        arrays["meta.input_features"] = np.array(weights.input_features, dtype=str)
    if weights.output_features:
        arrays["meta.output_features"] = np.array(weights.output_features, dtype=str)
    return {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in arrays.items()}


def save_npz(weights: ModelWeights, path: Path) -> None:
    np.savez(path, **weights_to_arrays(weights.validate()))  # type: ignore[arg-type]
