"""A served model: its description, its backend, and the ragged-batch runner shared by every backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lstm_serve.engine.backend import Backend
from lstm_serve.engine.cell import F32
from lstm_serve.engine.weights import ModelWeights, Normalization, check_metadata

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

    @property
    def key(self) -> tuple[str, int]:
        """What the data plane serves a model version under."""
        return (self.name, self.version)

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """A session's state: [h; c] of every layer, one float32 array of shape (2, L, H)."""
        return (2, self.num_layers, self.hidden_size)


class Model:
    def __init__(self, info: ModelInfo, backend: Backend, normalization: Normalization | None) -> None:
        self.info = info
        self.backend = backend
        self._norm = normalization
        self._inv_input_std = None if normalization is None else (1.0 / normalization.input_std).astype(np.float32)

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
    ) -> Model:
        """THE place a served model's description is made, whichever file it came from: its metadata checked
        against its sizes (check_metadata), then its ModelInfo. `sizes`: input, hidden, layers, output."""
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
        )
        return cls(info, backend, normalization)

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
        )

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
