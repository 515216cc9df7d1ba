"""Scores the served El Nino model's 12-month forecasts on the held-out years and writes them into validation.json.

Held-out data as in train.py: the months after the 588 training months (1999-2010). For every forecast origin t in
those years with 12 months still ahead, a session that has stepped through months 0..t-1 forecasts (lstm.v1 Forecast,
through the server's own DataPlane) from the observed month t: output k is the forecast of month t+1+k, each fed back
as the next month's input. The naive forecast is persistence: month t's temperature for every month ahead. Errors are
in degrees C, by horizon 1..12.

Run (statsmodels only here, for the data; never by the server or the tests):
    python -m venv /tmp/eval && /tmp/eval/bin/pip install statsmodels -e server -e client
    /tmp/eval/bin/python models/elnino/forecast_validation.py
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import statsmodels.api as sm

from lstm_serve.dataplane import DataPlane
from lstm_serve.engine.repository import Repository
from lstm_serve.metrics import Metrics
from lstm_serve.sessions.memory import MemorySessionStore

HERE = Path(__file__).resolve().parent
TRAIN_MONTHS = 588  # as in train.py
HORIZON = 12


def load_series() -> np.ndarray:
    frame = sm.datasets.elnino.load_pandas().data
    months = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
    return frame[months].to_numpy(dtype=np.float64).reshape(-1)


async def forecasts(series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(origins, forecasts [origin, horizon]) from the served model."""
    repository = Repository.scan(HERE.parent, frozenset({"elnino"}))
    plane = DataPlane(repository, MemorySessionStore(max_sessions=10, default_ttl=0.0), Metrics())
    x = series.astype(np.float32).reshape(-1, 1)
    await plane.create_session("elnino", "validation", 0)
    origins = np.arange(TRAIN_MONTHS, len(series) - HORIZON)
    await plane.step("validation", 1, x[:TRAIN_MONTHS])
    out = np.zeros((len(origins), HORIZON))
    for n, t in enumerate(origins):
        rows = np.full((HORIZON, 1), np.nan, np.float32)
        rows[0] = x[t]
        result = await plane.forecast(rows, session_id="validation")
        out[n] = result.outputs[:, 0]
        await plane.step("validation", n + 2, x[t])  # then month t is observed
    await plane.close()
    return origins, out


def main() -> None:
    series = load_series()
    assert series.shape == (732,)
    origins, predicted = asyncio.run(forecasts(series))
    targets = np.stack([series[t + 1 : t + 1 + HORIZON] for t in origins])
    naive = np.repeat(series[origins, None], HORIZON, axis=1)
    seasonal = np.stack([series[t + 1 - 12 : t + 1 - 12 + HORIZON] for t in origins])  # the same month a year before
    lstm_err, naive_err, seasonal_err = predicted - targets, naive - targets, seasonal - targets
    scores = json.loads((HERE / "validation.json").read_text())
    scores["forecast"] = {
        "description": (
            "12-month forecasts fed back month by month (lstm.v1 Forecast), from every held-out origin month with 12 "
            "months ahead; naive = persistence (the origin month's value); seasonal naive = the same month a year "
            "before. Made by forecast_validation.py."
        ),
        "origins": len(origins),
        "horizon_months": list(range(1, HORIZON + 1)),
        "lstm_mae": [round(float(v), 4) for v in np.abs(lstm_err).mean(axis=0)],
        "lstm_rmse": [round(float(v), 4) for v in np.sqrt((lstm_err**2).mean(axis=0))],
        "naive_persistence_mae": [round(float(v), 4) for v in np.abs(naive_err).mean(axis=0)],
        "naive_persistence_rmse": [round(float(v), 4) for v in np.sqrt((naive_err**2).mean(axis=0))],
        "naive_seasonal_mae": [round(float(v), 4) for v in np.abs(seasonal_err).mean(axis=0)],
    }
    text = json.dumps(scores, indent=2)
    for key in ("horizon_months", "lstm_mae", "lstm_rmse", "naive_persistence_mae", "naive_persistence_rmse"):
        text = _one_line(text, key)
    (HERE / "validation.json").write_text(_one_line(text, "naive_seasonal_mae") + "\n")
    print(json.dumps(scores["forecast"], indent=2))


def _one_line(text: str, key: str) -> str:
    """json.dumps(indent=2) puts every number of a list on its own line; one line per list reads better."""
    start = text.index(f'"{key}": [')
    end = text.index("]", start)
    inner = " ".join(part.strip() for part in text[start:end].split("\n"))
    return text[:start] + inner.replace("[ ", "[").rstrip() + "]" + text[end + 1 :]


if __name__ == "__main__":
    main()
