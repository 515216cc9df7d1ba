"""The load generator through a network that misbehaves at random: connections reset, cut off mid-message in either
direction, refused for a while, slowed down, or accepted and never answered. The faults come from a seeded random
schedule, at most FAULTS of them within FAULT_SECONDS, while the load runs. The run must end without a single error,
and every session's outputs must equal the engine's NumPy model run on that session's recorded inputs, with every step
applied exactly once (the server's step counter grows by exactly the steps sent).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lstm_client.loadtest import LoadConfig, run_load
from lstm_serve.engine.repository import load_model
from tests.faults import FaultProxy
from tests.fuzz.common import long_run_examples
from tests.servers import RunningServer

MODEL = "golden_l2_wide"  # 6 inputs, 3 outputs
FAULTS = 14  # at most, per run
FAULT_SECONDS = 6.0  # no fault starts later than this after the load started
KINDS = ("reset", "cut", "outage", "delay", "drop")
ROUNDS = max(1, long_run_examples() // 200)  # seeds per mode: 1 in CI, 10 in `make fuzz-long`


class FaultInjector(threading.Thread):
    """Injects faults in a seeded random order, with random pauses, until `stop` is set, FAULTS faults have been
    injected or FAULT_SECONDS have passed; leaves the proxy without any fault in force."""

    def __init__(self, proxy: FaultProxy, seed: int) -> None:
        super().__init__(name="fault-injector", daemon=True)
        self.proxy = proxy
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.injected: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + FAULT_SECONDS
            while len(self.injected) < FAULTS and time.monotonic() < deadline:
                if self.stop.wait(self.rng.uniform(0.02, 0.15)):
                    break
                self.inject(self.rng.choice(KINDS))
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.proxy.clear()
            self.proxy.reset_all()  # frees connections a drop left hanging

    def inject(self, kind: str) -> None:
        rng, proxy = self.rng, self.proxy
        self.injected.append(kind)
        if kind == "reset":
            proxy.reset_all()
        elif kind == "cut":
            proxy.cut_after(rng.randint(100, 6000), direction=rng.choice(["down", "up", "both"]))
        elif kind == "outage":
            proxy.outage(rng.uniform(0.05, 0.5))
        elif kind == "delay":
            proxy.delay(rng.uniform(0.001, 0.02), direction=rng.choice(["down", "up", "both"]))
            self.stop.wait(rng.uniform(0.1, 0.5))
            proxy.delay(0)
        else:  # drop: new connections swallowed for a while; the live ones reset, so that clients must reconnect
            proxy.drop(rng.uniform(0.5, 1.0))
            proxy.reset_all()
            self.stop.wait(rng.uniform(0.2, 0.5))
            proxy.drop(0)
            proxy.reset_all()  # what a client's connect timeout would do, sooner


def _steps_total(server: RunningServer) -> float:
    value = server.app.metrics.registry.get_sample_value("lstm_steps_total", {"model": MODEL})
    return value or 0.0


@pytest.mark.parametrize("round_", range(ROUNDS))
@pytest.mark.parametrize(
    ("mode", "sessions_per_stream", "seed"), [("stream", 4, 21), ("stream", 1, 22), ("unary", 1, 23)]
)
def test_the_load_generator_outlasts_random_network_faults(
    server: RunningServer, mode: str, sessions_per_stream: int, seed: int, round_: int
) -> None:
    seed += 100 * round_
    sessions, steps = 16, 150
    steps_before = _steps_total(server)
    with FaultProxy("127.0.0.1", server.app.port, seed=seed) as proxy:
        config = LoadConfig(
            target=proxy.target,
            model=MODEL,
            sessions=sessions,
            steps=steps,
            mode=mode,  # type: ignore[arg-type]
            sessions_per_stream=sessions_per_stream,
            duration=60.0,
            timeout=5.0,
            retry_budget=15.0,
            seed=seed,
            record=True,
        )
        injector = FaultInjector(proxy, seed)
        injector.start()
        try:
            result = asyncio.run(run_load(config))
        finally:
            injector.stop.set()
            injector.join(10)
    assert not injector.is_alive()
    assert injector.error is None, injector.error
    assert len(injector.injected) >= 3, injector.injected

    faults = f"faults {injector.injected}: {proxy.resets} resets, {proxy.dropped} dropped, {result.retries} retries"
    assert dict(result.errors) == {}, f"errors {dict(result.errors)}; {faults}"
    assert result.steps == sessions * steps
    assert (result.verified, result.mismatched) == (sessions, 0)
    assert _steps_total(server) - steps_before == sessions * steps  # each step applied once, none twice
    model = load_model(Path(server.app.settings.model_dir) / MODEL)
    for record in result.sessions:
        xs = np.concatenate([x.reshape(-1, 6) for x in record.inputs])
        ys = np.concatenate([y.reshape(-1, 3) for y in record.outputs])
        [(expected, _)] = model.run_batch([xs], [model.zero_state()])
        np.testing.assert_allclose(ys, expected, atol=1e-5, rtol=0, err_msg=record.session_id)
