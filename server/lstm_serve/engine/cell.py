"""The LSTM cell, batched, in PyTorch's layout and gate order (i, f, g, o).

For each layer k with input x (the layer below's h for k > 0):
    gates = x W_ih^T + b_ih + h W_hh^T + b_hh = [i | f | g | o]
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g),  h' = sigmoid(o) * tanh(c')
Everything is float32; the weights are transposed, pre-scaled and the two biases summed once, at load, so a step is
two GEMMs, two tanh and a few element-wise ops per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """PyTorch layout: W_ih (4H, I_k), W_hh (4H, H), b_ih and b_hh (4H,)."""

    W_ih: F32
    W_hh: F32
    b_ih: F32
    b_hh: F32

    @property
    def hidden_size(self) -> int:
        return int(self.W_hh.shape[1])

    @property
    def input_size(self) -> int:
        return int(self.W_ih.shape[1])


@dataclass(frozen=True, slots=True)
class _PackedLayer:
    """Transposed and pre-scaled: the i, f, o columns are halved, so that one tanh over all 4H pre-activations yields
    tanh(z/2) for those gates (sigmoid(z) = tanh(z/2)/2 + 1/2) and tanh(z) for g. Fewer NumPy calls per step is what
    matters at small batch sizes, where call overhead, not arithmetic, is the cost."""

    W_ih_T: F32  # (I_k, 4H), C-contiguous
    W_hh_T: F32  # (H, 4H)
    bias: F32  # (4H,) = b_ih + b_hh
    H: int

    @classmethod
    def pack(cls, lw: LayerWeights) -> _PackedLayer:
        H = lw.hidden_size
        scale = np.full(4 * H, 0.5, dtype=np.float32)
        scale[2 * H : 3 * H] = 1.0  # g keeps its scale
        bias = (lw.b_ih.astype(np.float32) + lw.b_hh.astype(np.float32)) * scale
        return cls(
            W_ih_T=np.ascontiguousarray(lw.W_ih.T * scale, dtype=np.float32),
            W_hh_T=np.ascontiguousarray(lw.W_hh.T * scale, dtype=np.float32),
            bias=bias,
            H=H,
        )


class NumpyCell:
    """A stack of LSTM layers plus an optional linear head, stepping a batch of independent sequences at once."""

    def __init__(self, layers: list[LayerWeights], head: tuple[F32, F32] | None) -> None:
        self._layers = [_PackedLayer.pack(lw) for lw in layers]
        self._head = (
            None if head is None else (np.ascontiguousarray(head[0].T, dtype=np.float32), head[1].astype(np.float32))
        )

    def step(self, x: F32, h: F32, c: F32) -> tuple[F32, F32, F32]:
        """One time step. x (B, I), h and c (L, B, H) -> y (B, O), h' and c' (L, B, H), all new arrays."""
        h_out = np.empty_like(h)
        c_out = np.empty_like(c)
        half = np.float32(0.5)
        inp = x
        for k, layer in enumerate(self._layers):
            H = layer.H
            z = inp @ layer.W_ih_T
            z += h[k] @ layer.W_hh_T
            z += layer.bias
            np.tanh(z, out=z)  # i, f, o columns now hold tanh(pre/2), g holds tanh(pre)
            s = z * half
            s += half  # sigmoid of i, f, o (the g columns of s are unused)
            c_new = c_out[k]
            np.multiply(s[:, H : 2 * H], c[k], out=c_new)
            c_new += s[:, :H] * z[:, 2 * H : 3 * H]
            np.tanh(c_new, out=h_out[k])
            h_out[k] *= s[:, 3 * H :]
            inp = h_out[k]
        return self.head(inp), h_out, c_out

    def head(self, h_top: F32) -> F32:
        if self._head is None:
            return h_top.copy()
        W_T, b = self._head
        return h_top @ W_T + b
