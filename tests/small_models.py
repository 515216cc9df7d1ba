"""Small random models of chosen sizes, for tests that need several models side by side."""

from __future__ import annotations

import numpy as np

from lstm_serve.engine.cell import LayerWeights
from lstm_serve.engine.model import Model
from lstm_serve.engine.numpy_backend import NumpyBackend
from lstm_serve.engine.weights import ModelWeights


def model(name: str, input_size: int, hidden: int, seed: int = 0) -> Model:
    rng = np.random.default_rng(seed)

    def f(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    four = 4 * hidden
    w = ModelWeights(layers=[LayerWeights(f(four, input_size), f(four, hidden), f(four), f(four))])
    return Model.from_weights(name, w, NumpyBackend(w))
