"""Trains the bundled `elnino` demo model and writes elnino.npz (npz format v1) beside this file.

Data: monthly sea-surface temperature of the El Nino region, Jan 1950 - Dec 2010 (732 months, degrees C), as shipped
by statsmodels (`statsmodels.datasets.elnino`). Task: one-step-ahead forecast; the input at month t is the
temperature of month t, the output is the forecast for month t+1. The model sees only the series, so it must learn the
season from the recent trajectory it keeps in its state.

Split: chronological, training on 1950-1998 (588 months), validation on 1999-2010 (144 months). Validation runs the
model over the whole series from a zero state (as a session would) and scores the forecasts of the validation months.

Run (torch and statsmodels are needed here only, never by the server or the tests):
    python -m venv /tmp/train && /tmp/train/bin/pip install torch==2.13.0 statsmodels numpy
    /tmp/train/bin/python models/elnino/train.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import statsmodels.api as sm
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 20261127
HIDDEN, LAYERS = 32, 2
TRAIN_MONTHS = 588
WINDOW, EPOCHS, BATCH = 60, 400, 32


class Forecaster(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, HIDDEN, num_layers=LAYERS, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out)


def load_series() -> np.ndarray:
    frame = sm.datasets.elnino.load_pandas().data
    months = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
    return frame[months].to_numpy(dtype=np.float64).reshape(-1)


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED)
    series = load_series()
    assert series.shape == (732,)
    assert np.isfinite(series).all()
    train = series[:TRAIN_MONTHS]
    mean, std = float(train.mean()), float(train.std())
    z = ((series - mean) / std).astype(np.float32)

    model = Forecaster()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    starts = np.arange(0, TRAIN_MONTHS - WINDOW - 1)
    for _epoch in range(EPOCHS):
        batch = rng.choice(starts, size=BATCH, replace=False)
        x = torch.tensor(np.stack([z[s : s + WINDOW] for s in batch]))[..., None]
        y = torch.tensor(np.stack([z[s + 1 : s + WINDOW + 1] for s in batch]))[..., None]
        loss = nn.functional.mse_loss(model(x)[:, 12:], y[:, 12:])  # the first year warms the state up
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()

    model.eval()
    with torch.no_grad():
        pred_z = model(torch.tensor(z[None, :-1, None]))[0, :, 0].numpy()
    forecast = pred_z * std + mean  # forecast[t] is for month t+1
    target = series[1:]
    naive = series[:-1]
    val = slice(TRAIN_MONTHS - 1, None)
    scores = {
        "train_months": TRAIN_MONTHS,
        "validation_months": len(target[val]),
        "lstm_mae": float(np.abs(forecast[val] - target[val]).mean()),
        "lstm_rmse": float(np.sqrt(((forecast[val] - target[val]) ** 2).mean())),
        "naive_last_value_mae": float(np.abs(naive[val] - target[val]).mean()),
        "naive_last_value_rmse": float(np.sqrt(((naive[val] - target[val]) ** 2).mean())),
    }
    print(json.dumps(scores, indent=2))

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    arrays: dict[str, np.ndarray] = {"meta.format_version": np.array(1, dtype=np.int64)}
    for k in range(LAYERS):
        for ours, theirs in (("W_ih", "weight_ih"), ("W_hh", "weight_hh"), ("b_ih", "bias_ih"), ("b_hh", "bias_hh")):
            arrays[f"lstm.{k}.{ours}"] = sd[f"lstm.{theirs}_l{k}"]
    arrays["head.W"], arrays["head.b"] = sd["head.weight"], sd["head.bias"]
    stats = np.array([mean], dtype=np.float32), np.array([std], dtype=np.float32)
    arrays["meta.input_mean"], arrays["meta.input_std"] = stats
    arrays["meta.output_mean"], arrays["meta.output_std"] = stats
    arrays["meta.input_features"] = np.array(["sst_c"])
    arrays["meta.output_features"] = np.array(["sst_c_next_month"])
    np.savez(HERE / "elnino.npz", **arrays)
    (HERE / "validation.json").write_text(json.dumps(scores, indent=2) + "\n")
    # Reference outputs of PyTorch itself on the first 36 months, for the end-to-end test of the served model.
    np.savez(
        HERE.parent.parent / "tests" / "fixtures" / "elnino_reference.npz",
        inputs=series[:36].astype(np.float32),
        outputs=forecast[:36].astype(np.float32),
    )


if __name__ == "__main__":
    main()
