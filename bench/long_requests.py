"""Short steps while other clients send long requests: the latency a one-step caller sees when four others each send
4096-step Predicts (issue 9: they used to compute on the event loop and hold every other call, health checks too).

Measured twice in one run: with the default `--inline-max-steps` (long requests compute in the compute threads) and
with it raised past 4096 (every request on the event loop, the first wave's behaviour), so the row's ratio is the
improvement on this machine.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from bench.latency import _measure as sequential_latency
from bench.servers import lstm_server
from lstm_client import Client

LONG_STEPS = 4096
LONG_CLIENTS = 4


def short_step_latency(model_dir: Path, model: str, *flags: str, calls: int = 400) -> dict[str, float]:
    """p50/p99 of sequential one-step Steps while LONG_CLIENTS threads keep sending LONG_STEPS-step Predicts."""
    with lstm_server(model_dir, "--models", model, "--max-steps-per-request", str(LONG_STEPS), *flags) as server:
        with Client(server.target) as client:
            session_id = client.create_session(model, ttl=0).id
            size = client.get_model(model).input_size
        long = np.random.default_rng(0).standard_normal((LONG_STEPS, size)).astype(np.float32)
        stop = threading.Event()
        done = [0] * LONG_CLIENTS

        def hammer(i: int) -> None:
            with Client(server.target) as c:
                deadline = time.monotonic() + 120  # bounded even if the measurement hangs
                while not stop.is_set() and time.monotonic() < deadline:
                    c.predict(model, long)
                    done[i] += 1

        threads = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(LONG_CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the long requests are flowing
        try:
            result = sequential_latency(server.target, session_id, calls, warmup=20)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        result["long_requests"] = float(sum(done))
        return result
