"""Forecast (issue 13) through the real client and server: against an independent float64 LSTM with the feedback
applied by hand, bit for bit against stepping a session with the fed-back inputs, and every refusal."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lstm_client import Client, InvalidArgument, NotFound
from tests.golden import FIXTURES, REPO
from tests.lstm_reference import ReferenceLstm
from tests.servers import RunningServer, start_server, stop_server, test_settings

ELNINO = REPO / "models" / "elnino" / "elnino.npz"
FORECAST_TOML = """version = "1"
weights = "golden_l3_head.npz"
[forecast]
feedback = { "2" = "1" }     # input 2 <- output 1
increments = { "0" = "0" }   # input 0 <- input 0 + output 0
"""


@pytest.fixture(scope="module")
def fc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """golden_l3_head (4 inputs, 2 outputs) with both kinds of feedback, and models whose [forecast] is wrong."""
    root = tmp_path_factory.mktemp("fc_models")
    for name, toml in (
        ("fc", FORECAST_TOML),
        ("bad_name", FORECAST_TOML.replace('"2" = "1"', 'nope = "1"')),
        ("bad_twice", FORECAST_TOML.replace('"2" = "1"', '"0" = "1"')),
        ("bad_key", FORECAST_TOML + "horizon = 3\n"),
    ):
        (root / name).mkdir()
        shutil.copyfile(FIXTURES / "golden_l3_head.npz", root / name / "golden_l3_head.npz")
        (root / name / "model.toml").write_text(toml)
    running, handle = start_server(test_settings(root, max_forecast_horizon=16))
    yield running
    stop_server(running, handle)


def _reference_forecast(
    ref: ReferenceLstm, h: np.ndarray, c: np.ndarray, rows: np.ndarray, links: list[tuple[int, int, str]]
) -> tuple[np.ndarray, np.ndarray]:
    """The forecast by hand, in float64: outputs and the inputs used."""
    xs = rows.astype(np.float64).copy()
    ys: list[np.ndarray] = []
    for k in range(len(xs)):
        if k:
            for i, o, mode in links:
                xs[k, i] = ys[-1][o] if mode == "value" else xs[k - 1, i] + ys[-1][o]
        y, h, c, _ = ref.step(xs[k], h, c)
        ys.append(y)
    return np.array(ys), xs


def test_elnino_forecast_matches_a_float64_reference_and_leaves_the_session_alone(client: Client) -> None:
    with np.load(FIXTURES / "elnino_reference.npz") as z:
        series = z["inputs"].astype(np.float32)
    ref = ReferenceLstm.from_npz(ELNINO)
    h, c = ref.zero_state()
    for x in series[:24]:
        _, h, c, _ = ref.step([x], h, c)
    rows = np.full((12, 1), np.nan, np.float32)
    rows[0] = series[24]
    expected, used = _reference_forecast(ref, h, c, rows, [(0, 0, "value")])

    with client.create_session("elnino") as session:
        session.step(series[:24, None])
        info = session.info()
        f = session.forecast(rows)
        assert f.outputs.shape == (12, 1)
        assert f.inputs.shape == (12, 1)
        assert f.seq == 1
        assert f.h.shape == f.c.shape == (2, 32)
        np.testing.assert_allclose(f.outputs, expected, atol=1e-3, rtol=0)
        np.testing.assert_allclose(f.inputs, used, atol=1e-3, rtol=0)
        assert f.inputs[0, 0] == series[24]
        assert np.array_equal(f.inputs[1:, 0], f.outputs[:-1, 0])
        after = session.info()
        assert (after.seq, after.steps) == (info.seq, info.steps)  # nothing committed
        # ... and the state is untouched: its next step is the forecast's first output
        assert np.array_equal(session.step(series[24:25]), f.outputs[0])


@pytest.mark.parametrize("model", ["elnino", "macro"])
def test_forecast_is_bit_identical_to_stepping_by_hand(client: Client, model: str) -> None:
    """A fork of the session stepped with the inputs the forecast used gives exactly the forecast's outputs
    (macro: an ONNX model whose predicted changes are added to two of its inputs)."""
    info = client.get_model(model)
    rng = np.random.default_rng(5)
    warmup = (25.0 + rng.standard_normal((8, info.input_size))).astype(np.float32)
    rows = (3.0 + rng.standard_normal((10, info.input_size))).astype(np.float32)
    for i, _, _ in info.feedback:
        rows[1:, i] = np.nan
    with client.create_session(model) as session:
        session.step(warmup)
        f = session.forecast(rows)
        with session.fork() as branch:
            by_hand = np.stack([branch.step(x) for x in f.inputs])
    assert np.array_equal(by_hand, f.outputs)
    for i, o, mode in info.feedback:  # the fed-back columns were filled as declared
        previous = 0.0 if mode == "value" else f.inputs[:-1, i]
        np.testing.assert_allclose(f.inputs[1:, i], previous + f.outputs[:-1, o], rtol=1e-6)
    known = [i for i in range(info.input_size) if i not in {link[0] for link in info.feedback}]
    assert np.array_equal(f.inputs[:, known], rows[:, known])


def test_both_kinds_of_feedback_from_a_given_state_match_the_reference(fc_server: RunningServer) -> None:
    ref = ReferenceLstm.from_npz(FIXTURES / "golden_l3_head.npz")
    rng = np.random.default_rng(9)
    h0 = (rng.standard_normal((3, 8)) * 0.5).astype(np.float32)
    c0 = (rng.standard_normal((3, 8)) * 0.5).astype(np.float32)
    rows = rng.standard_normal((16, 4)).astype(np.float32)
    links = [(0, 0, "delta"), (2, 1, "value")]
    expected, used = _reference_forecast(ref, h0.astype(np.float64), c0.astype(np.float64), rows, links)
    with fc_server.client() as client:
        assert client.get_model("fc").feedback == ((0, 0, "delta"), (2, 1, "value"))
        f = client.forecast(rows, model="fc", h0=h0, c0=c0)  # fed-back columns of rows 1.. hold numbers: ignored
        np.testing.assert_allclose(f.outputs, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(f.inputs, used, atol=1e-4, rtol=0)
        nan_rows = rows.copy()
        nan_rows[1:, [0, 2]] = np.nan
        assert np.array_equal(client.forecast(nan_rows, model="fc", h0=h0, c0=c0).outputs, f.outputs)
        # from the zero state by default, and the same as a session that starts there
        zero = client.forecast(nan_rows, model="fc")
        with client.create_session("fc") as session:
            assert np.array_equal(session.forecast(nan_rows).outputs, zero.outputs)
        expected_zero, _ = _reference_forecast(ref, *ref.zero_state(), rows, links)
        np.testing.assert_allclose(zero.outputs, expected_zero, atol=1e-4, rtol=0)


def test_a_model_without_feedback_forecasts_the_inputs_given(client: Client) -> None:
    xs = np.random.default_rng(2).standard_normal((7, 3)).astype(np.float32)
    assert client.get_model("golden_l1_nohead").feedback == ()
    f = client.forecast(xs, model="golden_l1_nohead")
    p = client.predict("golden_l1_nohead", xs)
    np.testing.assert_allclose(f.outputs, p.outputs, atol=1e-6, rtol=0)
    with pytest.raises(InvalidArgument, match="row 1, feature 0"):
        client.forecast(np.where(np.arange(7)[:, None] == 1, np.nan, xs), model="golden_l1_nohead")


def test_forecast_refusals(fc_server: RunningServer) -> None:
    rows = np.zeros((4, 4), np.float32)
    rows[1:, [0, 2]] = np.nan
    with fc_server.client() as client, client.create_session("fc") as session:
        with pytest.raises(InvalidArgument, match="either a session or a model"):
            client.forecast(rows)
        with pytest.raises(InvalidArgument, match="either a session or a model"):
            client.forecast(rows, session_id=session.id, model="fc")
        with pytest.raises(InvalidArgument, match="h0 and c0 must be unset"):
            client.forecast(rows, session_id=session.id, h0=np.zeros((3, 8)))
        with pytest.raises(InvalidArgument, match="over the limit of 16"):
            session.forecast(np.zeros((17, 4), np.float32))
        with pytest.raises(InvalidArgument, match="row 0"):
            session.forecast(np.full((3, 4), np.nan, np.float32))
        bad = rows.copy()
        bad[2, 3] = np.nan
        with pytest.raises(InvalidArgument, match="row 2, feature 3, which is not fed back"):
            session.forecast(bad)
        with pytest.raises(InvalidArgument, match=r"shape \[horizon, 4\]"):
            session.forecast(np.zeros((3, 5), np.float32))
        with pytest.raises(InvalidArgument, match="h0 must have shape"):
            client.forecast(rows, model="fc", h0=np.zeros((2, 8)))
        with pytest.raises(NotFound):
            client.forecast(rows, session_id="no-such-session")
        with pytest.raises(NotFound):
            client.forecast(rows, model="nope")
        assert session.info().seq == 0


def test_a_wrong_forecast_table_fails_its_model_only(fc_server: RunningServer) -> None:
    with fc_server.client() as client:
        models, failures = client.list_models_with_failures()
    assert [m.name for m in models] == ["fc"]
    reasons = {f.name: f.error for f in failures}
    assert "no input feature 'nope'" in reasons["bad_name"]
    assert "fills an input feature twice" in reasons["bad_twice"]
    assert "unknown keys in [forecast] ['horizon']" in reasons["bad_key"]


def test_forecast_is_retried_safely_it_commits_nothing(client: Client, tmp_path: Path) -> None:
    """Read-only: the same request twice answers the same."""
    with client.create_session("elnino") as session:
        session.step([[25.0], [26.0]])
        rows = np.array([[26.5]] + [[np.nan]] * 5, np.float32)
        assert np.array_equal(session.forecast(rows).outputs, session.forecast(rows).outputs)
