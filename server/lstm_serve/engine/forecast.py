"""Forecasting: which outputs a model feeds back as inputs (model.toml `[forecast]`), and the roll-forward itself.

    [forecast]
    feedback = { sst_c = "sst_c_next_month" }        # input feature <- output feature: next input = output
    increments = { unemp = "unemp_change_next" }     # next input = this step's input + output (a predicted change)

Keys and values are feature names, or indices ("0", "1", ...) for a model without names. The feedback is applied in
raw units: the output is de-normalised (as a client would see it), then normalised again as an input, exactly as if
the client had sent it with Step. That is why the roll-forward goes through `Model.run_batch` one step at a time: a
forecast is bit-identical to stepping a session by hand with the fed-back values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lstm_serve.engine.cell import F32
from lstm_serve.errors import InvalidInput, ModelLoadError

MODES = ("value", "delta")
_TABLE_KEYS = {"feedback": "value", "increments": "delta"}


@dataclass(frozen=True, slots=True)
class FeedbackLink:
    input: int  # index of the input feature that is filled
    output: int  # index of the output feature it is filled from
    mode: str  # "value": x = y; "delta": x = x_prev + y


def parse_forecast_table(
    table: Any, input_features: Sequence[str], output_features: Sequence[str], input_size: int, output_size: int
) -> tuple[FeedbackLink, ...]:
    """The `[forecast]` table of a model.toml, checked against the model's features; ModelLoadError naming the
    first problem."""
    if not isinstance(table, dict):
        raise ModelLoadError("[forecast] must be a table")
    unknown = sorted(set(table) - set(_TABLE_KEYS))
    if unknown:
        raise ModelLoadError(f"unknown keys in [forecast] {unknown}; allowed: {sorted(_TABLE_KEYS)}")
    links: list[FeedbackLink] = []
    for key, mode in _TABLE_KEYS.items():
        pairs = table.get(key, {})
        if not isinstance(pairs, dict):
            raise ModelLoadError(f"[forecast] {key} must be a table of input feature = output feature")
        for name, source in pairs.items():
            i = _index(name, input_features, input_size, "input")
            o = _index(source, output_features, output_size, "output")
            links.append(FeedbackLink(i, o, mode))
    inputs = [link.input for link in links]
    if len(set(inputs)) != len(inputs):
        raise ModelLoadError("[forecast] fills an input feature twice")
    return tuple(sorted(links, key=lambda link: link.input))


def _index(name: Any, features: Sequence[str], size: int, what: str) -> int:
    if not isinstance(name, str):
        raise ModelLoadError(f"[forecast]: {what} feature {name!r} must be a name or an index in quotes")
    if name in features:
        return list(features).index(name)
    if name.isdigit() and int(name) < size:
        return int(name)
    known = list(features) or [str(i) for i in range(size)]
    raise ModelLoadError(f"[forecast]: no {what} feature {name!r}; the model's are {known}")


def check_forecast_inputs(x: F32, links: Sequence[FeedbackLink], input_size: int, max_horizon: int) -> F32:
    """The caller's [N, I] inputs, checked: row 0 complete, the known columns of later rows finite; the fed-back
    columns of rows 1.. are ignored (NaN is the documented filler). Returns a writable float32 copy."""
    if x.ndim != 2 or x.shape[1] != input_size:
        raise InvalidInput(f"forecast inputs must have shape [horizon, {input_size}], got {list(x.shape)}")
    n = x.shape[0]
    if n == 0:
        raise InvalidInput("forecast horizon is 0 (inputs hold no row)")
    if n > max_horizon:
        raise InvalidInput(f"forecast horizon {n} is over the limit of {max_horizon} (--max-forecast-horizon)")
    xs = np.array(x, dtype=np.float32)
    if not np.isfinite(xs[0]).all():
        raise InvalidInput("forecast inputs: row 0 (the latest observed input) must be complete and finite")
    known = np.ones(input_size, dtype=bool)
    known[[link.input for link in links]] = False
    if not np.isfinite(xs[1:, known]).all():
        bad = np.argwhere(~np.isfinite(xs[1:, known]))[0]
        column = int(np.flatnonzero(known)[bad[1]])
        raise InvalidInput(
            f"forecast inputs: NaN or Inf at row {int(bad[0]) + 1}, feature {column}, which is not fed back "
            "(only the fed-back features of rows 1.. may be left NaN)"
        )
    return xs


def roll_forward(
    run: Callable[[F32, F32], tuple[F32, F32]], xs: F32, state: F32, links: Sequence[FeedbackLink]
) -> tuple[F32, F32, F32]:
    """Steps `run` (one step: x (1, I), state (2, L, H) -> y (1, O), new state) over the horizon, filling the fed-back
    columns of row k from the outputs of row k-1. Returns the outputs (N, O), the inputs used (N, I) and the final
    state. `xs` is filled in place."""
    outputs: list[F32] = []
    for k in range(len(xs)):
        if k:
            y = outputs[-1]
            for link in links:
                value = y[link.output] if link.mode == "value" else xs[k - 1, link.input] + y[link.output]
                xs[k, link.input] = value
        y_k, state = run(xs[k : k + 1], state)
        outputs.append(y_k[0])
    return np.stack(outputs), xs, state
