"""An independent float64 LSTM for the tests: the textbook equations (PyTorch's layout, gate order i, f, g, o) on
weights read straight from an npz file, with nothing of the server's code. It keeps every gate of every step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


def _sigmoid(z: F64) -> F64:
    result: F64 = 1.0 / (1.0 + np.exp(-z))
    return result


@dataclass
class ReferenceLstm:
    layers: list[tuple[F64, F64, F64, F64]]  # W_ih, W_hh, b_ih, b_hh
    head: tuple[F64, F64] | None
    input_mean: F64
    input_std: F64
    output_mean: F64
    output_std: F64

    @classmethod
    def from_npz(cls, path: Path) -> ReferenceLstm:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k].astype(np.float64) for k in z.files if not k.endswith("_features")}
        L = sum(1 for k in a if k.endswith(".W_ih"))
        layers = [tuple(a[f"lstm.{k}.{n}"] for n in ("W_ih", "W_hh", "b_ih", "b_hh")) for k in range(L)]
        head = (a["head.W"], a["head.b"]) if "head.W" in a else None
        I, O = layers[0][0].shape[1], (head[0].shape[0] if head else layers[0][1].shape[1])
        return cls(
            layers,
            head,
            a.get("meta.input_mean", np.zeros(I)),
            a.get("meta.input_std", np.ones(I)),
            a.get("meta.output_mean", np.zeros(O)),
            a.get("meta.output_std", np.ones(O)),
        )

    @property
    def hidden_size(self) -> int:
        return int(self.layers[0][1].shape[1])

    def zero_state(self) -> tuple[F64, F64]:
        shape = (len(self.layers), self.hidden_size)
        return np.zeros(shape), np.zeros(shape)

    def step(self, x: npt.ArrayLike, h: F64, c: F64) -> tuple[F64, F64, F64, dict[str, F64]]:
        """One step from raw x: (de-normalised y, h', c', gates {name: (L, H)})."""
        inp = (np.asarray(x, np.float64) - self.input_mean) / self.input_std
        H = self.hidden_size
        h_new, c_new = np.zeros_like(h), np.zeros_like(c)
        gates = {name: np.zeros_like(h) for name in ("forget", "input", "output", "candidate", "c", "h")}
        for k, (W_ih, W_hh, b_ih, b_hh) in enumerate(self.layers):
            z = W_ih @ inp + b_ih + W_hh @ h[k] + b_hh
            i, f, g, o = _sigmoid(z[:H]), _sigmoid(z[H : 2 * H]), np.tanh(z[2 * H : 3 * H]), _sigmoid(z[3 * H :])
            c_new[k] = f * c[k] + i * g
            h_new[k] = o * np.tanh(c_new[k])
            for name, value in (("forget", f), ("input", i), ("output", o), ("candidate", g)):
                gates[name][k] = value
            gates["c"][k], gates["h"][k] = c_new[k], h_new[k]
            inp = h_new[k]
        y = inp if self.head is None else self.head[0] @ inp + self.head[1]
        return y * self.output_std + self.output_mean, h_new, c_new, gates
