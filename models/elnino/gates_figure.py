"""Draws docs/gates.png: what the El Nino model's gates do around the onset of the 1997-98 El Nino.

The served model steps through the monthly series from January 1950 (lstm.v1 Step with with_gates, through the
server's own DataPlane) and the figure shows January 1996 - December 1998: the temperature and the model's one-month
forecast, then, for the second (top) LSTM layer, every unit's forget gate, input gate and cell state c. It also prints
the numbers docs/gates.md quotes.

Run (statsmodels for the data and matplotlib for the figure, only here):
    python -m venv /tmp/eval && /tmp/eval/bin/pip install statsmodels matplotlib -e server -e client
    /tmp/eval/bin/python models/elnino/gates_figure.py
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import statsmodels.api as sm

from lstm_serve.dataplane import DataPlane
from lstm_serve.engine.repository import Repository
from lstm_serve.metrics import Metrics
from lstm_serve.sessions.memory import MemorySessionStore

HERE = Path(__file__).resolve().parent
OUT = HERE.parent.parent / "docs" / "gates.png"
FIRST, LAST = (1996 - 1950) * 12, (1999 - 1950) * 12  # Jan 1996 .. Dec 1998
LAYER = 1  # the top layer, which the head reads


def load_series() -> np.ndarray:
    frame = sm.datasets.elnino.load_pandas().data
    months = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
    return frame[months].to_numpy(dtype=np.float64).reshape(-1)


async def trace(series: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    plane = DataPlane(
        Repository.scan(HERE.parent, frozenset({"elnino"})),
        MemorySessionStore(max_sessions=10, default_ttl=0.0),
        Metrics(),
    )
    await plane.create_session("elnino", "gates", 0)
    x = series[:LAST].astype(np.float32).reshape(-1, 1)
    outcome = await plane.step_with_gates("gates", 1, x)
    await plane.close()
    assert outcome.gates is not None
    gates = {name: getattr(outcome.gates, name)[:, LAYER] for name in ("forget", "input", "output", "candidate", "c")}
    return outcome.outputs[:, 0], gates


def main() -> None:
    series = load_series()
    forecast, gates = asyncio.run(trace(series))
    months = np.arange(FIRST, LAST)
    years = 1950 + months / 12
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True, gridspec_kw={"height_ratios": [1.2, 1, 1, 1]})
    ax = axes[0]
    ax.plot(years, series[FIRST:LAST], label="observed SST (C)", color="black")
    ax.plot(years + 1 / 12, forecast[FIRST:LAST], label="one-month forecast", color="tab:orange", linestyle="--")
    ax.set_ylabel("C")
    ax.legend(loc="upper left")
    ax.set_title("El Nino model around the 1997-98 onset: layer 2 of 2, all 32 units")
    order = np.argsort(gates["forget"][FIRST:LAST].mean(axis=0))
    for ax, name, cmap, limits in (
        (axes[1], "forget", "viridis", (0, 1)),
        (axes[2], "input", "viridis", (0, 1)),
        (axes[3], "c", "RdBu_r", None),
    ):
        values = gates[name][FIRST:LAST][:, order].T
        vmin, vmax = limits if limits else (-np.abs(values).max(), np.abs(values).max())
        image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                          extent=(years[0], years[-1] + 1 / 12, 0, values.shape[0]), origin="lower")  # fmt: skip
        ax.set_ylabel(f"{name}\nunit")
        fig.colorbar(image, ax=ax, pad=0.01)
    axes[-1].set_xlabel("year")
    fig.tight_layout()
    fig.savefig(OUT, dpi=90)
    print(f"wrote {OUT}")

    calm, onset = slice((1996 - 1950) * 12, (1997 - 1950) * 12), slice((1997 - 1950) * 12 + 3, (1997 - 1950) * 12 + 9)
    for name in ("forget", "input", "output"):
        print(f"{name}: mean {gates[name][calm].mean():.3f} in 1996, {gates[name][onset].mean():.3f} Apr-Sep 1997")
    c_norm = np.linalg.norm(gates["c"], axis=1)
    print(f"|c|: mean {c_norm[calm].mean():.2f} in 1996, max {c_norm[onset].max():.2f} Apr-Sep 1997")
    big = np.abs(gates["c"][onset]).max(axis=0) - np.abs(gates["c"][calm]).max(axis=0)
    print(f"units whose |c| grew by > 0.5 at the onset: {int((big > 0.5).sum())} of {big.size}")
    saturated = (gates["forget"][FIRST:LAST] > 0.9).mean()
    shut = (gates["input"][FIRST:LAST] < 0.1).mean()
    print(f"forget > 0.9: {saturated:.0%} of unit-months 1996-98; input < 0.1: {shut:.0%}")
    keep = order[-3:]  # the three units that forget least
    late = slice((1998 - 1950) * 12, LAST)
    for unit in keep:
        f, c = gates["forget"][FIRST:LAST, unit].mean(), gates["c"][:, unit]
        print(f"unit {unit}: forget {f:.2f}; c {c[calm].mean():+.2f} in 1996, {c[late].mean():+.2f} in 1998")


if __name__ == "__main__":
    main()
