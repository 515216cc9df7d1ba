"""The cell's internals, for the steps that ask for them (StepRequest.with_gates).

A second, plain computation of the LSTM equations (PyTorch's layout and gate order, as in engine.cell):
    i = sigmoid(x W_ii^T + b_ii + h W_hi^T + b_hi),  f = sigmoid(...),  g = tanh(...),  o = sigmoid(...)
    c' = f * c + i * g,  h' = o * tanh(c')
It keeps every intermediate, which the served cell (packed weights, one tanh for all four gates) does not, and runs
only when asked, so the normal step path pays nothing for it. ONNX-backed models get it from the weights read out of
their graph, checked against the graph once before first use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lstm_serve.engine.cell import F32, LayerWeights
from lstm_serve.engine.weights import Normalization

GATE_NAMES = ("forget", "input", "output", "candidate", "c", "h")


@dataclass(frozen=True, slots=True)
class GateTrace:
    """Per time step and layer, each (T, L, H): the gate activations, the candidate, and the new c and h."""

    forget: F32
    input: F32
    output: F32
    candidate: F32
    c: F32
    h: F32


class GateCell:
    """The plain LSTM, float32, over one sequence (batch 1)."""

    def __init__(self, layers: list[LayerWeights], normalization: Normalization | None) -> None:
        self._layers = [
            (lw.W_ih.astype(np.float32), lw.W_hh.astype(np.float32), (lw.b_ih + lw.b_hh).astype(np.float32))
            for lw in layers
        ]
        self._norm = normalization

    def trace(self, xs: F32, state: F32) -> GateTrace:
        """xs (T, I) raw inputs (normalised here as the served model does), state (2, L, H) before the first step."""
        if self._norm is not None:
            xs = (xs - self._norm.input_mean) * (1.0 / self._norm.input_std).astype(np.float32)
        T, L, H = len(xs), len(self._layers), state.shape[2]
        out = {name: np.empty((T, L, H), dtype=np.float32) for name in GATE_NAMES}
        h = state[0].astype(np.float32)
        c = state[1].astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            for t in range(T):
                inp = xs[t]
                h_new, c_new = np.empty_like(h), np.empty_like(c)
                for k, (W_ih, W_hh, b) in enumerate(self._layers):
                    z = W_ih @ inp + W_hh @ h[k] + b
                    i, f = _sigmoid(z[:H]), _sigmoid(z[H : 2 * H])
                    g, o = np.tanh(z[2 * H : 3 * H]), _sigmoid(z[3 * H :])
                    c_new[k] = f * c[k] + i * g
                    h_new[k] = o * np.tanh(c_new[k])
                    for name, value in zip(GATE_NAMES, (f, i, o, g, c_new[k], h_new[k]), strict=True):
                        out[name][t, k] = value
                    inp = h_new[k]
                h, c = h_new, c_new
        return GateTrace(**out)


def _sigmoid(z: F32) -> F32:
    result: F32 = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    return result
