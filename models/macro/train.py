"""Trains the bundled `macro` demo model and exports it to ONNX (model.onnx), served by the ONNX Runtime backend.

Data: US quarterly macroeconomic series, 1959Q2 - 2009Q3 (202 quarters), as shipped by statsmodels
(`statsmodels.datasets.macrodata`). Inputs per quarter: unemployment rate (%), inflation (% annualised), 3-month
T-bill rate (%), real GDP growth (% quarter on quarter). Outputs: next quarter's unemployment rate and inflation.

Split: chronological, training on 1959Q2 - 1998Q4 (159 quarters), validation on 1999Q1 - 2009Q3 (43 quarters), which
includes the 2008-09 recession. Validation runs the model over the whole series from a zero state (as a session
would) and scores the forecasts for the validation quarters against the last-value forecast.

Run (torch, onnx and statsmodels are needed here only, never by the server or the tests):
    python -m venv /tmp/train && /tmp/train/bin/pip install torch==2.13.0 statsmodels onnx onnxruntime numpy
    /tmp/train/bin/python models/macro/train.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import statsmodels.api as sm
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 20261127
INPUTS = ["unemp", "infl", "tbilrate", "realgdp_growth"]
OUTPUTS = ["unemp_change_next", "infl_change_next"]
HIDDEN = 8
TRAIN = 159
EPOCHS, WINDOW, BATCH = 400, 32, 24


class Forecaster(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(len(INPUTS), HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, len(OUTPUTS))

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, (hn, cn) = self.lstm(x, (h0, c0))
        return self.head(y), hn, cn


def load() -> np.ndarray:
    data = sm.datasets.macrodata.load_pandas().data
    growth = 100.0 * (data["realgdp"].to_numpy()[1:] / data["realgdp"].to_numpy()[:-1] - 1.0)
    table = np.column_stack([data[c].to_numpy()[1:] for c in ("unemp", "infl", "tbilrate")] + [growth])
    return table.astype(np.float64)


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED)
    series = load()  # (202, 4)
    assert series.shape == (202, 4)
    in_mean, in_std = series[:TRAIN].mean(0), series[:TRAIN].std(0)
    targets = np.vstack([series[1:, :2] - series[:-1, :2], np.zeros((1, 2))])  # change to the next quarter
    out_mean, out_std = targets[:TRAIN].mean(0), targets[:TRAIN].std(0)
    zx = ((series - in_mean) / in_std).astype(np.float32)
    zy = ((targets - out_mean) / out_std).astype(np.float32)

    model = Forecaster()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    starts = np.arange(0, TRAIN - WINDOW - 1)
    for _ in range(EPOCHS):
        batch = rng.choice(starts, size=BATCH, replace=False)
        x = torch.tensor(np.stack([zx[s : s + WINDOW] for s in batch]))
        y = torch.tensor(np.stack([zy[s : s + WINDOW] for s in batch]))
        zeros = torch.zeros(1, BATCH, HIDDEN)
        loss = nn.functional.mse_loss(model(x, zeros, zeros)[0][:, 4:], y[:, 4:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()

    zeros = torch.zeros(1, 1, HIDDEN)
    with torch.no_grad():
        pred = model(torch.tensor(zx[None, :-1]), zeros, zeros)[0][0].numpy() * out_std + out_mean
    actual, naive = targets[:-1], np.zeros_like(targets[:-1])  # forecast[t] is the change from t to t+1
    val = slice(TRAIN - 1, None)
    scores: dict[str, object] = {"train_quarters": TRAIN, "validation_quarters": len(actual[val])}
    for i, name in enumerate(OUTPUTS):
        scores[f"{name}_lstm_mae"] = float(np.abs(pred[val, i] - actual[val, i]).mean())
        scores[f"{name}_naive_no_change_mae"] = float(np.abs(naive[val, i] - actual[val, i]).mean())
    print(json.dumps(scores, indent=2))

    args = (torch.tensor(zx[None, :8]), zeros, zeros)
    torch.onnx.export(
        model,
        args,
        str(HERE / "model.onnx"),
        dynamo=False,
        input_names=["x", "h0", "c0"],
        output_names=["y", "hn", "cn"],
        dynamic_axes={
            "x": {0: "batch", 1: "seq"},
            "h0": {1: "batch"},
            "c0": {1: "batch"},
            "y": {0: "batch", 1: "seq"},
            "hn": {1: "batch"},
            "cn": {1: "batch"},
        },
    )
    session = ort.InferenceSession(str(HERE / "model.onnx"), providers=["CPUExecutionProvider"])
    z0 = np.zeros((1, 1, HIDDEN), np.float32)
    ort_pred = session.run(["y"], {"x": zx[None, :-1], "h0": z0, "c0": z0})[0][0] * out_std + out_mean
    assert np.abs(ort_pred - pred).max() < 1e-4, "the ONNX export differs from PyTorch"

    def listing(values: np.ndarray) -> str:
        return "[" + ", ".join(f"{v:.9g}" for v in values) + "]"

    (HERE / "model.toml").write_text(
        "# Made by train.py in this directory (data, split and validation error: see there and validation.json).\n"
        'version = "1"\n'
        "description = \"Change of the US unemployment rate and inflation to next quarter (points) from this quarter's "
        f"unemployment, inflation, T-bill rate and real GDP growth; LSTM({HIDDEN}) + linear head, exported from "
        f"PyTorch to ONNX. Validation 1999-2009: MAE {scores['unemp_change_next_lstm_mae']:.2f} / "
        f"{scores['infl_change_next_lstm_mae']:.2f} points vs {scores['unemp_change_next_naive_no_change_mae']:.2f} / "
        f'{scores["infl_change_next_naive_no_change_mae"]:.2f} for the no-change forecast."\n'
        'backend = "onnx"\n'
        'weights = "model.onnx"\n'
        f"input_features = {json.dumps(INPUTS)}\n"
        f"output_features = {json.dumps(OUTPUTS)}\n\n"
        "[normalization]\n"
        f"input_mean = {listing(in_mean)}\ninput_std = {listing(in_std)}\n"
        f"output_mean = {listing(out_mean)}\noutput_std = {listing(out_std)}\n"
    )
    (HERE / "validation.json").write_text(json.dumps(scores, indent=2) + "\n")
    np.savez(
        HERE.parent.parent / "tests" / "fixtures" / "macro_reference.npz",
        inputs=series[:40].astype(np.float32),
        outputs=pred[:40].astype(np.float32),
    )


if __name__ == "__main__":
    main()
