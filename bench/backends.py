"""Per-step cost of each backend, in-process (no gRPC): H=128 and H=512, batch 1 and 64, BLAS and ORT on one thread;
plus the ONNX Runtime session options the server uses, against the alternatives.

    python -m bench.backends
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from threadpoolctl import threadpool_limits

from lstm_serve.convert.onnx_graph import onnx_from_weights
from lstm_serve.engine.backend import Backend
from lstm_serve.engine.cell import LayerWeights
from lstm_serve.engine.numpy_backend import NumpyBackend
from lstm_serve.engine.onnx_backend import OnnxBackend, session_options
from lstm_serve.engine.weights import ModelWeights

INPUT, OUTPUT = 16, 8


def random_weights(H: int, layers: int = 1, seed: int = 0) -> ModelWeights:
    rng = np.random.default_rng(seed)
    scale = 1 / np.sqrt(H)

    def w(*shape: int) -> np.ndarray:
        out: np.ndarray = (rng.standard_normal(shape) * scale).astype(np.float32)
        return out

    stack = [LayerWeights(w(4 * H, INPUT if k == 0 else H), w(4 * H, H), w(4 * H), w(4 * H)) for k in range(layers)]
    return ModelWeights(layers=stack, head=(w(OUTPUT, H), w(OUTPUT)))


def per_call_us(call: Callable[[], object], seconds: float = 0.4) -> float:
    """Median over 5 rounds of the mean time per call."""
    call()
    rounds = []
    for _ in range(5):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 5:
            call()
            n += 1
        rounds.append(elapsed / n * 1e6)
    return statistics.median(rounds)


def backend_table() -> list[tuple[str, int, int, float, float]]:
    """(backend, H, B, us per call, us per session-step)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(limits=1):
        for H in (128, 512):
            weights = random_weights(H)
            path = Path(tmp) / f"h{H}.onnx"
            onnx.save(onnx_from_weights(weights), str(path))
            backends: dict[str, Backend] = {"numpy": NumpyBackend(weights), "onnx": OnnxBackend(path)}
            for B in (1, 64):
                x = np.random.default_rng(1).standard_normal((B, INPUT)).astype(np.float32)
                h = np.zeros((1, B, H), np.float32)
                for name, backend in backends.items():
                    us = per_call_us(functools.partial(backend.step, x, h, h))
                    rows.append((name, H, B, us, us / B))
    return rows


def session_option_table() -> list[tuple[str, int, float, float]]:
    """ORT option variants on the H=128 and H=512 graphs at batch 64: (variant, H, us per call B=1, B=64)."""
    variants: dict[str, Callable[[], ort.SessionOptions]] = {
        "server (1 thread, sequential, ORT_ENABLE_ALL)": lambda: session_options(1),
        "2 intra-op threads": lambda: session_options(2),
        "basic graph optimisations only": lambda: _with_level(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
        "no graph optimisations": lambda: _with_level(ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for H in (128, 512):
            path = Path(tmp) / f"h{H}.onnx"
            onnx.save(onnx_from_weights(random_weights(H)), str(path))
            for name, make in variants.items():
                session = ort.InferenceSession(str(path), make(), providers=["CPUExecutionProvider"])
                timings = []
                for B in (1, 64):
                    feeds = {
                        "x": np.zeros((B, 1, INPUT), np.float32),
                        "h0": np.zeros((1, B, H), np.float32),
                        "c0": np.zeros((1, B, H), np.float32),
                    }
                    timings.append(per_call_us(functools.partial(session.run, None, feeds)))
                rows.append((name, H, timings[0], timings[1]))
    return rows


def _with_level(level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
    options = session_options(1)
    options.graph_optimization_level = level
    return options


def markdown() -> list[str]:
    lines = [
        "## Backends, in-process (no gRPC), one thread",
        "",
        f"One `step` of a 1-layer LSTM with I={INPUT}, O={OUTPUT} (random weights), median of 5 rounds.",
        "",
        "| backend | H | batch | µs per call | µs per session-step |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {H} | {B} | {us:.1f} | {per:.2f} |" for name, H, B, us, per in backend_table()]
    lines += [
        "",
        "ONNX Runtime session options (µs per `run`, batch 1 / batch 64):",
        "",
        "| options | H | batch 1 | batch 64 |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {H} | {b1:.1f} | {b64:.1f} |" for name, H, b1, b64 in session_option_table()]
    return [*lines, ""]


if __name__ == "__main__":
    print("\n".join(markdown()))
