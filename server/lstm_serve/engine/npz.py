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

import math
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from lstm_serve.engine import files
from lstm_serve.engine.cell import F32, LayerWeights
from lstm_serve.engine.weights import ModelWeights, Normalization
from lstm_serve.errors import ModelLoadError

FORMAT_VERSION = 1
MAX_MEMBERS = 4096  # 1000 layers; bounds the work on a zip directory before anything in it is known to be sane
_ZIP_OVERHEAD = 64 << 20  # the file may exceed the arrays' budget by its zip and .npy headers, not by more
_LAYER_KEY = re.compile(r"^lstm\.(\d+)\.(W_ih|W_hh|b_ih|b_hh)$")
_NORM_KEYS = ("meta.input_mean", "meta.input_std", "meta.output_mean", "meta.output_std")
_STRING_KEYS = ("meta.input_features", "meta.output_features")
_OTHER_KEYS = {"meta.format_version", "head.W", "head.b", *_STRING_KEYS, *_NORM_KEYS}
_READ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    ValueError,
    EOFError,
    zlib.error,
    struct.error,
    NotImplementedError,
    RuntimeError,
    UnicodeDecodeError,
)


def load_npz(path: Path, within: Path | None = None) -> ModelWeights:
    """Reads and checks an npz model. `within` is the model directory the file must stay in (None for a file named
    on the command line).

    The archive is checked before any array is read: every member must be an .npy array of a known key, once; its
    header must declare a dtype of the right kind, a shape the format expects, and exactly the size the zip records;
    and all arrays together may declare files.MAX_MODEL_BYTES at most. So a header claiming terabytes, a compression
    bomb under an extra key or a pickle costs a few kilobytes of reading, not the server's memory; np.load, which
    reads every array before anything can look at the key list, is not used."""
    limit = files.MAX_MODEL_BYTES + _ZIP_OVERHEAD
    with files.open_model_file(path, within, "weights file", limit) as file:
        try:
            return weights_from_arrays(_read_arrays(file))
        except ModelLoadError as exc:
            public = files.one_line(f"invalid npz: {exc.public}")
            raise ModelLoadError(f"{path}: invalid npz: {exc.message}", public=public) from None


@dataclass(frozen=True, slots=True)
class _Declared:
    """What a member's .npy header declares, read without its data."""

    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


def _known(key: str) -> bool:
    return key in _OTHER_KEYS or _LAYER_KEY.match(key) is not None


def _read_arrays(file: IO[bytes]) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(file) as archive:
            declared = _declared(archive)
            _check_declared(declared)
            return {key: _read(archive, key, d) for key, d in declared.items()}
    except _READ_ERRORS as exc:
        raise ModelLoadError(f"not a readable npz file ({files.one_line(str(exc)) or type(exc).__name__})") from None


def _declared(archive: zipfile.ZipFile) -> dict[str, _Declared]:
    """Names first (from the zip directory), then each member's .npy header, then sizes against the budget."""
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise ModelLoadError(f"{len(infos)} members; an npz model has at most {MAX_MEMBERS}")
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if info.is_dir() or not info.filename.endswith(".npy"):
            raise ModelLoadError(f"member {info.filename!r} is not an .npy array")
        key = info.filename[: -len(".npy")]
        if key in members:
            raise ModelLoadError(f"duplicate member {info.filename!r}")  # which of the two would be served?
        members[key] = info
    unknown = sorted(k for k in members if not _known(k))
    if unknown:
        raise ModelLoadError(f"unknown keys {unknown}")
    budget = files.MAX_MODEL_BYTES
    total = 0
    declared: dict[str, _Declared] = {}
    for key, info in members.items():
        if info.flag_bits & 0x1:
            raise ModelLoadError(f"{key} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ModelLoadError(
                f"{key} uses zip compression method {info.compress_type}; numpy writes stored or deflated"
            )
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ModelLoadError(f"{key} is in .npy format version {version}; 1.0 and 2.0 are read")
            header = member.tell()
        if dtype.hasobject:
            raise ModelLoadError(f"{key} holds Python objects: pickled data is never loaded")
        if any(d < 0 for d in shape):
            raise ModelLoadError(f"{key} declares a negative dimension: shape {shape}")
        size = math.prod(shape) * dtype.itemsize
        total += size
        if total > budget:
            raise ModelLoadError(
                f"{key} declares shape {shape} {dtype} = {files.human(size)}; the arrays of one model may total "
                f"{files.human(budget)} at most"
            )
        if info.file_size != header + size:
            raise ModelLoadError(
                f"{key}: the zip declares {info.file_size} bytes for the member, its .npy header {header + size}"
            )
        declared[key] = _Declared(info, shape, dtype)
    return declared


def _check_declared(declared: dict[str, _Declared]) -> None:
    """The dtypes and shapes the headers declare, checked as weights_from_arrays and ModelWeights.validate check the
    data (with the same messages), so that an array of the wrong kind or size is refused before it is read. What
    needs values (the format version, NaN, std > 0) is left to them."""
    for key, d in declared.items():
        if key in _STRING_KEYS:
            if d.dtype.kind != "U" or len(d.shape) != 1:
                raise ModelLoadError(f"{key} must be a 1-D array of strings")
        elif key == "meta.format_version":
            if d.shape != () or d.dtype.kind not in "iu":
                raise ModelLoadError(
                    f"unknown format version (a {d.dtype} array of shape {d.shape}); this server reads version "
                    f"{FORMAT_VERSION}"
                )
        elif not np.issubdtype(d.dtype, np.floating):
            raise ModelLoadError(f"{key} has dtype {d.dtype}, expected a float type")
    shapes = {key: d.shape for key, d in declared.items()}
    layer_ids = sorted({int(m.group(1)) for k in shapes if (m := _LAYER_KEY.match(k))})
    if layer_ids != list(range(len(layer_ids))):
        raise ModelLoadError(f"layers must be numbered 0..L-1, found {layer_ids}")
    w_ih, w_hh = shapes.get("lstm.0.W_ih"), shapes.get("lstm.0.W_hh")
    if w_ih is None or w_hh is None or len(w_ih) != 2 or len(w_hh) != 2:
        return  # no size to derive the others from: weights_from_arrays names the problem; the budget still holds
    I, H = w_ih[1], w_hh[1]
    expected: dict[str, tuple[int, ...]] = {}
    for k in layer_ids:
        expected |= {f"lstm.{k}.W_ih": (4 * H, I if k == 0 else H), f"lstm.{k}.W_hh": (4 * H, H)}
        expected |= {f"lstm.{k}.b_ih": (4 * H,), f"lstm.{k}.b_hh": (4 * H,)}
    O = H
    if "head.W" in shapes:
        O = shapes["head.W"][0] if len(shapes["head.W"]) == 2 else -1
        expected |= {"head.W": (O, H), "head.b": (O,)}
    expected |= dict.fromkeys(_NORM_KEYS[:2], (I,)) | dict.fromkeys(_NORM_KEYS[2:], (O,))
    for key, want in expected.items():
        if key in shapes and shapes[key] != want:
            raise ModelLoadError(f"{key} has shape {shapes[key]}, expected {want}")
    for key, what, n in (("meta.input_features", "input", I), ("meta.output_features", "output", O)):
        if key in shapes and shapes[key][0] != n:
            raise ModelLoadError(f"{shapes[key][0]} {what} feature names for {what}_size {n}")


def _read(archive: zipfile.ZipFile, key: str, declared: _Declared) -> np.ndarray:
    """One member's array: its header was checked, so this reads exactly the declared bytes (and the zip's CRC)."""
    with archive.open(declared.info) as member:
        array: np.ndarray = np.lib.format.read_array(member, allow_pickle=False)
    if array.shape != declared.shape or array.dtype != declared.dtype:
        raise ModelLoadError(f"{key} changed while being read")
    return array


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
