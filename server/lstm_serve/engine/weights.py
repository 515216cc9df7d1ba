"""A model's parameters, independent of file format and backend, and the checks every loader runs on them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from lstm_serve.engine.cell import F32, LayerWeights
from lstm_serve.errors import ModelLoadError


@dataclass(frozen=True, slots=True)
class Normalization:
    """x' = (x - input_mean) / input_std before the cell; y = y' * output_std + output_mean after it."""

    input_mean: F32
    input_std: F32
    output_mean: F32
    output_std: F32


@dataclass(frozen=True, slots=True)
class ModelWeights:
    layers: list[LayerWeights]
    head: tuple[F32, F32] | None = None  # W (O, H), b (O,)
    normalization: Normalization | None = None
    input_features: tuple[str, ...] = field(default=())
    output_features: tuple[str, ...] = field(default=())

    @property
    def input_size(self) -> int:
        return self.layers[0].input_size

    @property
    def hidden_size(self) -> int:
        return self.layers[0].hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def output_size(self) -> int:
        return self.hidden_size if self.head is None else int(self.head[0].shape[0])

    @property
    def parameter_count(self) -> int:
        arrays = [a for lw in self.layers for a in (lw.W_ih, lw.W_hh, lw.b_ih, lw.b_hh)] + list(self.head or ())
        return sum(int(a.size) for a in arrays)

    def validate(self) -> ModelWeights:
        """Raises ModelLoadError naming the first problem; returns self so loaders can chain it."""
        if not self.layers:
            raise ModelLoadError("the model has no LSTM layer")
        H = self.hidden_size
        for k, lw in enumerate(self.layers):
            expect_in = self.input_size if k == 0 else H
            _shape(f"lstm.{k}.W_ih", lw.W_ih, (4 * H, expect_in))
            _shape(f"lstm.{k}.W_hh", lw.W_hh, (4 * H, H))
            _shape(f"lstm.{k}.b_ih", lw.b_ih, (4 * H,))
            _shape(f"lstm.{k}.b_hh", lw.b_hh, (4 * H,))
        if self.head is not None:
            O = int(self.head[0].shape[0]) if self.head[0].ndim == 2 else -1
            _shape("head.W", self.head[0], (O, H))
            _shape("head.b", self.head[1], (O,))
        check_metadata(
            self.input_size, self.output_size, self.normalization, self.input_features, self.output_features, "meta."
        )
        return self


NORMALIZATION_KEYS = ("input_mean", "input_std", "output_mean", "output_std")


def normalization_from(values: Mapping[str, Sequence[float]], where: str) -> Normalization | None:
    """Statistics given by name (model.toml's [normalization], convert's flags) as a Normalization: all four or
    none. Their sizes and values are checked with the model's by check_metadata, the one check of them."""
    if not values:
        return None
    missing = [k for k in NORMALIZATION_KEYS if k not in values]
    unknown = sorted(set(values) - set(NORMALIZATION_KEYS))
    if missing or unknown:
        raise ModelLoadError(
            f"{where} needs exactly {list(NORMALIZATION_KEYS)}; missing {missing}"
            + (f", unknown {unknown}" * bool(unknown))
        )
    try:
        return Normalization(*(np.asarray(values[k], np.float32).reshape(-1) for k in NORMALIZATION_KEYS))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: the statistics must be lists of numbers ({exc})") from None


def check_metadata(
    input_size: int,
    output_size: int,
    norm: Normalization | None,
    input_features: Sequence[str],
    output_features: Sequence[str],
    prefix: str,
) -> None:
    """THE check of what a model says about its inputs and outputs beside its weights, whatever carries it (an npz's
    meta.* arrays, model.toml for an ONNX graph, convert's flags): one value per feature, finite, std > 0, one name
    per feature. `prefix` names where they came from in the messages ("meta.", "[normalization] ")."""
    if norm is not None:
        for name, arr, n in (
            ("input_mean", norm.input_mean, input_size),
            ("input_std", norm.input_std, input_size),
            ("output_mean", norm.output_mean, output_size),
            ("output_std", norm.output_std, output_size),
        ):
            _shape(f"{prefix}{name}", arr, (n,))
        if np.any(norm.input_std <= 0) or np.any(norm.output_std <= 0):
            raise ModelLoadError(f"{prefix}input_std and {prefix}output_std must be > 0")
    for what, names, n in (("input", input_features, input_size), ("output", output_features, output_size)):
        if names and len(names) != n:
            raise ModelLoadError(f"{len(names)} {what} feature names for {what}_size {n}")


def _shape(name: str, arr: F32, expected: tuple[int, ...]) -> None:
    if arr.shape != expected:
        raise ModelLoadError(f"{name} has shape {arr.shape}, expected {expected}")
    if not np.all(np.isfinite(arr)):
        raise ModelLoadError(f"{name} contains NaN or Inf")
