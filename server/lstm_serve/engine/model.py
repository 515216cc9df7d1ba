"""A served model: its description, its backend, and the ragged-batch runner shared by every backend."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lstm_serve.engine.backend import Backend
from lstm_serve.engine.cell import F32
from lstm_serve.engine.forecast import FeedbackLink
from lstm_serve.engine.gates import GateCell
from lstm_serve.engine.weights import ModelWeights, Normalization, check_metadata
from lstm_serve.errors import Unsupported

GATE_CHECK_TOLERANCE = 1e-4  # weights read out of an ONNX graph must reproduce the graph's step to this

# What a batch hands each session: its outputs (T, O), its new state (2, L, H), and whether both are finite.
StepResult = tuple[F32, F32, bool]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: int  # the repository's version directory (the flat layout: model.toml's `version`, default 1)
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
    def key(self) -> tuple[str, int]:
        """What the data plane serves a model version under."""
        return (self.name, self.version)

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
    def build(
        cls,
        backend: Backend,
        *,
        name: str,
        version: int,
        description: str,
        sizes: tuple[int, int, int, int],
        parameters: int,
        normalization: Normalization | None,
        input_features: tuple[str, ...],
        output_features: tuple[str, ...],
        metadata_prefix: str = "meta.",
        feedback: tuple[FeedbackLink, ...] = (),
        weights: Callable[[], ModelWeights] | None = None,
        fingerprint: str = "",
    ) -> Model:
        """THE place a served model's description is made, whichever file it came from: its metadata checked
        against its sizes (check_metadata), then its ModelInfo. `sizes`: input, hidden, layers, output; `feedback`:
        its forecast table; `weights` and `fingerprint`: see __init__."""
        input_size, hidden_size, num_layers, output_size = sizes
        check_metadata(input_size, output_size, normalization, input_features, output_features, metadata_prefix)
        info = ModelInfo(
            name=name,
            version=version,
            description=description,
            backend=backend.name,
            input_size=input_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            output_size=output_size,
            input_features=input_features,
            output_features=output_features,
            normalized=normalization is not None,
            parameters=parameters,
            feedback=feedback,
        )
        return cls(info, backend, normalization, weights=weights, fingerprint=fingerprint)

    @classmethod
    def from_weights(
        cls, name: str, weights: ModelWeights, backend: Backend, *, version: int = 1, description: str = ""
    ) -> Model:
        return cls.build(
            backend,
            name=name,
            version=version,
            description=description,
            sizes=(weights.input_size, weights.hidden_size, weights.num_layers, weights.output_size),
            parameters=weights.parameter_count,
            normalization=weights.normalization,
            input_features=weights.input_features,
            output_features=weights.output_features,
            weights=lambda: weights,
            fingerprint=weights_fingerprint(weights),
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
        """Advances B sessions at once: xs[b] (T_b, I) raw inputs, states[b] (2, L, H); returns, per session, its
        outputs (T_b, O) and its new state (see run_batch_checked)."""
        return [(ys, state) for ys, state, _ in self.run_batch_checked(xs, states)]

    def run_batch_checked(self, xs: list[F32], states: list[F32]) -> list[StepResult]:
        """run_batch, plus whether each session's inputs, outputs and new state are all finite: neither NaN or Inf
        given nor finite inputs so large that the arithmetic overflows may become a session's state, and one check
        over the whole batch costs what a check per session would cost for one.

        Sequences may differ in length: sorted longest first, the sessions still running at time t are a prefix of
        the batch, so each time step is one backend call on contiguous slices. Arguments are never modified, so a
        failure leaves every session as it was. The arrays returned are read-only views into one buffer per batch
        (whoever keeps them copies them anyway, into bytes).
        """
        B = len(xs)
        lengths = [len(x) for x in xs]
        T = max(lengths)
        if min(lengths) != T:
            return self._run_ragged(xs, states, lengths)
        X = xs[0][:, None, :] if B == 1 else np.stack(xs, axis=1)  # (T, B, I)
        if self._norm is not None and self._inv_input_std is not None:
            X = (X - self._norm.input_mean) * self._inv_input_std
        S = states[0][:, :, None, :] if B == 1 else np.stack(states, axis=2)  # (2, L, B, H), read only
        h, c = S[0], S[1]
        # Huge (finite) inputs may overflow; the caller refuses a result that is not finite, so numpy's warning
        # would only be noise in the server's log.
        with np.errstate(over="ignore", invalid="ignore"):
            if T == 1:
                y, h, c = self.backend.step(X[0], h, c)
                Y = y[None]
            else:
                Y = np.empty((T, B, self.info.output_size), dtype=np.float32)
                for t in range(T):
                    Y[t], h, c = self.backend.step(X[t], h, c)
            return self._finish(X, Y, np.stack((h, c)), range(B), lengths)

    def _run_ragged(self, xs: list[F32], states: list[F32], lengths: list[int]) -> list[StepResult]:
        B, T = len(xs), max(lengths)
        order = sorted(range(B), key=lambda b: -lengths[b])
        lengths = [lengths[b] for b in order]
        X = np.zeros((T, B, self.info.input_size), dtype=np.float32)
        for pos, b in enumerate(order):
            X[: lengths[pos], pos] = xs[b]
        if self._norm is not None and self._inv_input_std is not None:
            X = (X - self._norm.input_mean) * self._inv_input_std
        S = np.stack([states[b] for b in order], axis=2)  # a copy, updated in place: the inputs stay untouched
        h, c = S[0], S[1]
        Y = np.zeros((T, B, self.info.output_size), dtype=np.float32)  # the unwritten ends stay finite
        active = B
        with np.errstate(over="ignore", invalid="ignore"):
            for t in range(T):
                while lengths[active - 1] <= t:
                    active -= 1
                y, h_new, c_new = self.backend.step(X[t, :active], h[:, :active], c[:, :active])
                Y[t, :active] = y
                h[:, :active] = h_new
                c[:, :active] = c_new
            position = {b: pos for pos, b in enumerate(order)}
            return self._finish(X, Y, S, [position[b] for b in range(B)], lengths)

    def _finish(self, X: F32, Y: F32, S: F32, positions: Sequence[int], lengths: list[int]) -> list[StepResult]:
        """De-normalises the outputs (T, B, O) and hands each session its slices of them and of the new state
        (2, L, B, H), in the caller's order, with one finiteness check of inputs (T, B, I), outputs and states for
        the whole batch (an Inf input may well give a finite state: tanh saturates)."""
        if self._norm is not None:
            Y *= self._norm.output_std
            Y += self._norm.output_mean
        ok = np.isfinite(S).all(axis=(0, 1, 3)) & np.isfinite(Y).all(axis=(0, 2)) & np.isfinite(X).all(axis=(0, 2))
        finite: list[bool] = np.atleast_1d(ok).tolist()
        Y.flags.writeable = False
        S.flags.writeable = False
        return [(Y[: lengths[p], p], S[:, :, p], finite[p]) for p in positions]


def weights_fingerprint(weights: ModelWeights) -> str:
    """A hash of every parameter (shapes and float32 values, in a fixed order)."""
    digest = hashlib.sha256()
    arrays = [a for lw in weights.layers for a in (lw.W_ih, lw.W_hh, lw.b_ih, lw.b_hh)] + list(weights.head or ())
    for array in arrays:
        digest.update(repr(array.shape).encode())
        digest.update(np.ascontiguousarray(array, "<f4").tobytes())
    return digest.hexdigest()
