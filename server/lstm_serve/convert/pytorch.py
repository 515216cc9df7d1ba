"""PyTorch state_dicts of an nn.LSTM (+ an optional nn.Linear head): .safetensors (read without torch) or .pt."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lstm_serve.engine.cell import LayerWeights
from lstm_serve.engine.weights import ModelWeights
from lstm_serve.errors import ModelLoadError

_LSTM_KEY = re.compile(
    r"^(?P<prefix>.*?)(?P<kind>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(?P<k>\d+)(?P<rev>_reverse)?$"
)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from None


def read_pt(path: Path) -> dict[str, np.ndarray]:
    """The only place anything is unpickled, and only with torch's weights_only loader."""
    try:
        import torch
    except ImportError:
        raise ModelLoadError(
            f"{path}: reading a .pt file needs PyTorch (pip install torch). Without it, save the state_dict as "
            "safetensors: safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
        ) from None
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: torch.load(weights_only=True) failed: {exc}") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"{path}: expected a state_dict (a dict of tensors), found {type(obj).__name__}")
    return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def weights_from_state_dict(
    sd: Mapping[str, np.ndarray], prefix: str | None = None, head_prefix: str | None = None
) -> ModelWeights:
    matches = {k: m for k in sd if (m := _LSTM_KEY.match(k))}
    prefixes = sorted({m.group("prefix") for m in matches.values()})
    if prefix is not None:
        prefixes = [p for p in prefixes if p == prefix]
    if not prefixes:
        found = f" under prefix {prefix!r}" if prefix is not None else ""
        raise ModelLoadError(
            f"no nn.LSTM weights (weight_ih_l0, ...){found} in the state_dict; keys: {sorted(sd)[:12]}"
        )
    if len(prefixes) > 1:
        raise ModelLoadError(f"several LSTMs in the state_dict ({prefixes}); choose one with --prefix")
    p = prefixes[0]
    mine = {k: m for k, m in matches.items() if m.group("prefix") == p}
    if any(m.group("rev") for m in mine.values()):
        raise ModelLoadError("bidirectional LSTM (keys *_reverse): it needs the whole sequence and cannot be streamed")
    if any(m.group("kind") == "weight_hr" for m in mine.values()):
        raise ModelLoadError("LSTM with proj_size (weight_hr_l*) is not supported")
    L = 1 + max(int(m.group("k")) for m in mine.values())

    def get(key: str) -> np.ndarray | None:
        return np.asarray(sd[p + key], dtype=np.float32) if p + key in sd else None

    layers = []
    for k in range(L):
        W_ih, W_hh = get(f"weight_ih_l{k}"), get(f"weight_hh_l{k}")
        if W_ih is None or W_hh is None:
            raise ModelLoadError(f"missing {p}weight_ih_l{k} or {p}weight_hh_l{k}")
        zeros = np.zeros(W_hh.shape[0], np.float32)  # nn.LSTM(bias=False)
        b_ih, b_hh = get(f"bias_ih_l{k}"), get(f"bias_hh_l{k}")
        layers.append(LayerWeights(W_ih, W_hh, zeros if b_ih is None else b_ih, zeros if b_hh is None else b_hh))
    return ModelWeights(layers=layers, head=_find_head(sd, p, layers[0].hidden_size, head_prefix)).validate()


def _find_head(
    sd: Mapping[str, np.ndarray], lstm_prefix: str, H: int, head_prefix: str | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """An nn.Linear(H, O): a `<prefix>weight` of shape (O, H) beside a `<prefix>bias` of shape (O,)."""
    candidates = [
        k[: -len("weight")]
        for k, v in sd.items()
        if k.endswith("weight") and np.ndim(v) == 2 and np.shape(v)[1] == H and not _LSTM_KEY.match(k)
    ]
    if head_prefix is not None:
        candidates = [c for c in candidates if c == head_prefix]
        if not candidates:
            raise ModelLoadError(f"no linear layer {head_prefix}weight of shape (O, {H}) in the state_dict")
    if not candidates:
        return None
    if len(candidates) > 1:
        raise ModelLoadError(f"several linear layers could be the head ({candidates}); choose with --head-prefix")
    c = candidates[0]
    W = np.asarray(sd[c + "weight"], dtype=np.float32)
    b = np.asarray(sd[c + "bias"], dtype=np.float32) if c + "bias" in sd else np.zeros(W.shape[0], np.float32)
    return W, b
