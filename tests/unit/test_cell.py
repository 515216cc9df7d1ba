"""The engine against PyTorch's own numbers, and the batching invariants the server relies on."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lstm_serve.engine.model import Model
from lstm_serve.engine.npz import load_npz
from lstm_serve.engine.numpy_backend import NumpyBackend
from lstm_serve.engine.weights import ModelWeights, Normalization
from tests.golden import CASES, TOLERANCE, golden


def _model(weights: ModelWeights) -> Model:
    return Model.from_weights("m", weights, NumpyBackend(weights))


@pytest.mark.parametrize("case", CASES)
def test_whole_sequences_match_pytorch(case: str) -> None:
    g = golden(case)
    model = _model(load_npz(g.weights))
    B = g.inputs.shape[0]
    states = [np.stack([g.h0[:, b], g.c0[:, b]]) for b in range(B)]
    results = model.run_batch([g.inputs[b] for b in range(B)], states)
    for b, (ys, state) in enumerate(results):
        np.testing.assert_allclose(ys, g.outputs[b], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(state[0], g.hn[:, b], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(state[1], g.cn[:, b], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_one_step_at_a_time_matches_pytorch(case: str) -> None:
    """What a streaming session does: T calls of one step each, state carried between them."""
    g = golden(case)
    model = _model(load_npz(g.weights))
    state = np.stack([g.h0[:, 0], g.c0[:, 0]])
    for t in range(g.inputs.shape[1]):
        [(y, state)] = model.run_batch([g.inputs[0, t : t + 1]], [state])
        np.testing.assert_allclose(y[0], g.outputs[0, t], atol=TOLERANCE, rtol=0)


def test_run_batch_leaves_its_arguments_alone() -> None:
    g = golden("golden_l3_head")
    model = _model(load_npz(g.weights))
    xs = [g.inputs[0].copy(), g.inputs[1, :3].copy()]
    states = [model.zero_state() + 0.25, model.zero_state() - 0.5]
    before = [a.copy() for a in xs + states]
    model.run_batch(xs, states)
    for a, b in zip(xs + states, before, strict=True):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=7), seed=st.integers(0, 2**16))
def test_ragged_batch_equals_each_session_alone(lengths: list[int], seed: int) -> None:
    """Sessions of different lengths share a batch without affecting each other."""
    g = golden("golden_l3_head")
    model = _model(load_npz(g.weights))
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, 4)).astype(np.float32) for n in lengths]
    states = [rng.normal(size=model.info.state_shape).astype(np.float32) for _ in lengths]
    together = model.run_batch(xs, states)
    for x, state, (ys, new_state) in zip(xs, states, together, strict=True):
        [(ys_alone, state_alone)] = model.run_batch([x], [state])
        np.testing.assert_allclose(ys, ys_alone, atol=1e-6, rtol=0)
        np.testing.assert_allclose(new_state, state_alone, atol=1e-6, rtol=0)


def test_normalization_wraps_the_cell() -> None:
    g = golden("golden_l3_head")
    plain = load_npz(g.weights)
    norm = Normalization(
        input_mean=np.array([1.0, -2.0, 0.5, 3.0], np.float32),
        input_std=np.array([2.0, 0.5, 1.0, 4.0], np.float32),
        output_mean=np.array([10.0, -1.0], np.float32),
        output_std=np.array([3.0, 0.1], np.float32),
    )
    normalized = ModelWeights(plain.layers, plain.head, norm).validate()
    raw = g.inputs[0] * norm.input_std + norm.input_mean  # what a client sends in raw units
    [(ys, _)] = _model(normalized).run_batch([raw], [_model(plain).zero_state()])
    [(ys_plain, _)] = _model(plain).run_batch([g.inputs[0]], [_model(plain).zero_state()])
    np.testing.assert_allclose(ys, ys_plain * norm.output_std + norm.output_mean, atol=1e-5, rtol=1e-6)


def test_saturated_gates_stay_finite() -> None:
    g = golden("golden_l1_nohead")
    model = _model(load_npz(g.weights))
    with np.errstate(all="raise"):  # no overflow warnings from exp() on huge pre-activations
        [(ys, state)] = model.run_batch([np.full((3, 3), 1e30, np.float32)], [model.zero_state()])
    assert np.all(np.isfinite(ys))
    assert np.all(np.abs(state[0]) <= 1.0)
