"""A served model: its description, its backend, and the ragged-batch runner shared by every backend."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lstm_serve.engine.backend import Backend
from lstm_serve.engine.cell import F32
from lstm_serve.engine.forecast import FeedbackLink
from lstm_serve.engine.gates import GateCell
from lstm_serve.engine.weights import ModelWeights, Normalization
from lstm_serve.errors import Unsupported

GATE_CHECK_TOLERANCE = 1e-4  # weights read out of an ONNX graph must reproduce the graph's step to this


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str
    description: str
    backend: str
    input_size: int
    hidden_size: int
    num_layers: int
    output_size: int
    input_features: tuple[str, ...]
    output_features: tuple[str, ...]
    normalized: bool
    parameters: int = 0
    feedback: tuple[FeedbackLink, ...] = ()  # model.toml [forecast]: the outputs a forecast feeds back as inputs

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """A session's state: [h; c] of every layer, one float32 array of shape (2, L, H)."""
        return (2, self.num_layers, self.hidden_size)


class Model:
    def __init__(
        self,
        info: ModelInfo,
        backend: Backend,
        normalization: Normalization | None,
        *,
        weights: Callable[[], ModelWeights] | None = None,
        fingerprint: str = "",
    ) -> None:
        """`weights` gives the model's parameters for the gate computation (read only when first asked: an ONNX
        graph's are extracted then); `fingerprint` identifies the parameters (a hash), so an exported session state
        is imported only into the very same model."""
        self.info = info
        self.backend = backend
        self._norm = normalization
        self._inv_input_std = None if normalization is None else (1.0 / normalization.input_std).astype(np.float32)
        self._weights = weights
        self._gate_cell: GateCell | Unsupported | None = None
        self._gate_lock = threading.Lock()
        digest = hashlib.sha256(fingerprint.encode())
        if normalization is not None:
            for array in (normalization.input_mean, normalization.input_std):
                digest.update(np.ascontiguousarray(array, "<f4").tobytes())
            for array in (normalization.output_mean, normalization.output_std):
                digest.update(np.ascontiguousarray(array, "<f4").tobytes())
        self.fingerprint = digest.hexdigest()

    @classmethod
    def from_weights(
        cls, name: str, weights: ModelWeights, backend: Backend, *, version: str = "1", description: str = ""
    ) -> Model:
        info = ModelInfo(
            name=name,
            version=version,
            description=description,
            backend=backend.name,
            input_size=weights.input_size,
            hidden_size=weights.hidden_size,
            num_layers=weights.num_layers,
            output_size=weights.output_size,
            input_features=weights.input_features,
            output_features=weights.output_features,
            normalized=weights.normalization is not None,
            parameters=weights.parameter_count,
        )
        return cls(
            info, backend, weights.normalization, weights=lambda: weights, fingerprint=weights_fingerprint(weights)
        )

    def gate_cell(self) -> GateCell:
        """The plain cell on this model's weights (built once, in whichever thread asks first), or Unsupported with
        the reason: no weights readable, or weights that do not reproduce the served backend's step."""
        with self._gate_lock:
            if self._gate_cell is None:
                self._gate_cell = self._build_gate_cell()
            cell = self._gate_cell
        if isinstance(cell, Unsupported):
            raise cell
        return cell

    def _build_gate_cell(self) -> GateCell | Unsupported:
        if self._weights is None:
            return Unsupported(f"model {self.info.name!r} cannot show its gates: its weights are not readable")
        try:
            weights = self._weights()
        except Exception as exc:  # an ONNX graph whose LSTM the extractor does not understand
            message = getattr(exc, "public", None) or type(exc).__name__
            return Unsupported(f"model {self.info.name!r} cannot show its gates: {message}")
        cell = GateCell(weights.layers, self._norm)
        # The weights must be the ones the backend computes with: one step from a non-trivial state, compared.
        rng = np.random.default_rng(13)
        x = rng.standard_normal((1, self.info.input_size)).astype(np.float32)
        state = (rng.standard_normal(self.info.state_shape) * 0.5).astype(np.float32)
        [(_, served)] = self.run_batch([x], [state])
        trace = cell.trace(x, state)
        if not np.allclose(trace.h[0], served[0], atol=GATE_CHECK_TOLERANCE) or not np.allclose(
            trace.c[0], served[1], atol=GATE_CHECK_TOLERANCE
        ):
            return Unsupported(
                f"model {self.info.name!r} cannot show its gates: the weights read from its file do not reproduce "
                "the served computation"
            )
        return cell

    def zero_state(self) -> F32:
        return np.zeros(self.info.state_shape, dtype=np.float32)

    def run_batch(self, xs: list[F32], states: list[F32]) -> list[tuple[F32, F32]]:
        """Advances B sessions at once: xs[b] (T_b, I) raw inputs, states[b] (2, L, H).

        Returns, per session, its outputs (T_b, O) and its new state. Sequences may differ in length: sorted longest
        first, the sessions still running at time t are a prefix of the batch, so each time step is one backend call
        on contiguous slices. Arguments are never modified, so a failure leaves every session as it was.
        """
        B = len(xs)
        lengths = [len(x) for x in xs]
        T = max(lengths)
        if min(lengths) == T:  # the common case: no reordering
            order: list[int] | range = range(B)
            X = np.stack(xs, axis=1)  # (T, B, I)
        else:
            order = sorted(range(B), key=lambda b: -lengths[b])
            lengths = [lengths[b] for b in order]
            X = np.zeros((T, B, self.info.input_size), dtype=np.float32)
            for pos, b in enumerate(order):
                X[: lengths[pos], pos] = xs[b]
        if self._norm is not None and self._inv_input_std is not None:
            X = (X - self._norm.input_mean) * self._inv_input_std
        S = np.stack([states[b] for b in order], axis=2)  # (2, L, B, H), a copy: the inputs stay untouched
        h, c = S[0], S[1]
        Y = np.empty((T, B, self.info.output_size), dtype=np.float32)
        active = B
        # Huge (finite) inputs may overflow; the data plane refuses a result that is not finite, so numpy's warning
        # would only be noise in the server's log.
        with np.errstate(over="ignore", invalid="ignore"):
            for t in range(T):
                while lengths[active - 1] <= t:
                    active -= 1
                y, h_new, c_new = self.backend.step(X[t, :active], h[:, :active], c[:, :active])
                Y[t, :active] = y
                h[:, :active] = h_new
                c[:, :active] = c_new
            if self._norm is not None:
                Y *= self._norm.output_std
                Y += self._norm.output_mean
        position = {b: pos for pos, b in enumerate(order)}
        return [(Y[: lengths[p], p].copy(), S[:, :, p].copy()) for p in (position[b] for b in range(B))]


def weights_fingerprint(weights: ModelWeights) -> str:
    """A hash of every parameter (shapes and float32 values, in a fixed order)."""
    digest = hashlib.sha256()
    arrays = [a for lw in weights.layers for a in (lw.W_ih, lw.W_hh, lw.b_ih, lw.b_hh)] + list(weights.head or ())
    for array in arrays:
        digest.update(repr(array.shape).encode())
        digest.update(np.ascontiguousarray(array, "<f4").tobytes())
    return digest.hexdigest()
