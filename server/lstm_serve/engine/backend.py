"""The one interface both backends implement; the batcher and the service never learn which one runs."""

from __future__ import annotations

from typing import Protocol

from lstm_serve.engine.cell import F32


class Backend(Protocol):
    name: str

    def step(self, x: F32, h: F32, c: F32) -> tuple[F32, F32, F32]:
        """One time step of B independent sequences: x (B, I), h and c (L, B, H) -> y (B, O), h', c'.

        Inputs are normalised already; outputs are de-normalised by the caller. Must not modify its arguments.
        """
        ...
