"""The NumPy backend: the cell of engine.cell, computed in-process with BLAS pinned to one thread by the app."""

from __future__ import annotations

from lstm_serve.engine.cell import F32, NumpyCell
from lstm_serve.engine.weights import ModelWeights


class NumpyBackend:
    name = "numpy"

    def __init__(self, weights: ModelWeights) -> None:
        self._cell = NumpyCell(weights.layers, weights.head)

    def step(self, x: F32, h: F32, c: F32) -> tuple[F32, F32, F32]:
        return self._cell.step(x, h, c)
