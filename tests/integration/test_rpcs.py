"""Every RPC through the real client against a real server, outputs compared with PyTorch's."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from lstm_client import AlreadyExists, AsyncClient, Client, InvalidArgument, NotFound, SessionGone
from tests.golden import TOLERANCE, golden
from tests.servers import RunningServer


def test_list_models_reports_the_served_and_the_broken(client: Client) -> None:
    models, failures = client.list_models_with_failures()
    assert {m.name for m in models} == {"elnino", "macro", "golden_l1_nohead", "golden_l3_head", "golden_l2_wide"}
    assert [f.name for f in failures] == ["broken"]
    assert "no such file" in failures[0].error


def test_get_model(client: Client) -> None:
    info = client.get_model("golden_l3_head")
    assert (info.input_size, info.hidden_size, info.num_layers, info.output_size) == (4, 8, 3, 2)
    assert (info.backend, info.version, info.normalized) == ("numpy", "1", False)
    demo = client.get_model("elnino")
    assert (demo.input_features, demo.output_features, demo.normalized) == (("sst_c",), ("sst_c_next_month",), True)
    with pytest.raises(NotFound, match=r"unknown model 'nope'; served models: elnino, golden_.*, macro"):
        client.get_model("nope")
    with pytest.raises(NotFound, match=r"model 'broken' failed to load: .*no such file"):
        client.get_model("broken")


def test_session_steps_match_pytorch_one_at_a_time_and_several_at_once(client: Client) -> None:
    g = golden("golden_l2_wide")
    with client.create_session("golden_l2_wide") as session:
        # The golden run starts from a random state; a session starts from zeros, so compare with Predict from zeros
        # first, then check that Predict with the golden initial state is PyTorch's result.
        expected = client.predict("golden_l2_wide", g.inputs[0]).outputs
        singles = [session.step(x) for x in g.inputs[0, :10]]
        assert singles[0].shape == (3,)
        block = session.step(g.inputs[0, 10:25])
        assert block.shape == (15, 3)
        streamed = np.stack(list(session.stream(g.inputs[0, 25:])))
        got = np.concatenate([np.stack(singles), block, streamed])
        np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
        info = session.info()
        assert (info.seq, info.steps) == (10 + 1 + 15, 40)


@pytest.mark.parametrize("case", ["golden_l1_nohead", "golden_l3_head", "golden_l2_wide"])
def test_predict_from_a_given_state_matches_pytorch(client: Client, case: str) -> None:
    g = golden(case)
    for b in range(g.inputs.shape[0]):
        p = client.predict(case, g.inputs[b], h0=g.h0[:, b], c0=g.c0[:, b])
        np.testing.assert_allclose(p.outputs, g.outputs[b], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(p.h, g.hn[:, b], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(p.c, g.cn[:, b], atol=TOLERANCE, rtol=0)


def test_demo_model_serves_pytorchs_forecasts(client: Client) -> None:
    ref = np.load("tests/fixtures/elnino_reference.npz")
    with client.create_session("elnino") as session:
        got = np.array([session.step([x])[0] for x in ref["inputs"]])
    np.testing.assert_allclose(got, ref["outputs"], atol=1e-4, rtol=0)  # degrees C, values near 25


def test_second_demo_model_runs_on_onnx_runtime_and_matches_pytorch(client: Client) -> None:
    info = client.get_model("macro")
    assert (info.backend, info.input_size, info.output_size, info.normalized) == ("onnx", 4, 2, True)
    assert info.input_features == ("unemp", "infl", "tbilrate", "realgdp_growth")
    ref = np.load("tests/fixtures/macro_reference.npz")
    with client.create_session("macro") as session:
        got = np.stack(list(session.stream(ref["inputs"])))
    np.testing.assert_allclose(got, ref["outputs"], atol=1e-4, rtol=0)  # percentage points


def test_create_get_reset_close(client: Client) -> None:
    g = golden("golden_l3_head")
    session = client.create_session("golden_l3_head", ttl=timedelta(minutes=5), session_id="device-42")
    assert session.id == "device-42"
    with pytest.raises(AlreadyExists):
        client.create_session("golden_l3_head", session_id="device-42")
    first = session.step(g.inputs[0, :4])
    info = session.info()
    assert (info.model, info.seq, info.steps, info.idle_ttl) == ("golden_l3_head", 1, 4, timedelta(minutes=5))
    assert info.created <= info.last_used

    reset = session.reset()
    assert (reset.seq, reset.steps) == (1, 4)  # seq goes on counting; the state is zero again
    np.testing.assert_allclose(session.step(g.inputs[0, :4]), first, atol=1e-6)

    attached = client.session("device-42")  # e.g. after a client restart
    assert attached.seq == 2
    attached.step(g.inputs[0, 4])
    session.close()
    session.close()  # closing twice is fine
    with pytest.raises(SessionGone) as err:
        client.session_info("device-42")
    assert err.value.reason == "closed"


def test_server_generated_ids_and_ttl_defaults(client: Client) -> None:
    a = client.create_session("elnino")
    b = client.create_session("elnino", ttl=0)
    assert a.id != b.id
    assert len(a.id) >= 22
    assert a.info().idle_ttl == timedelta(hours=1)
    assert b.info().idle_ttl is None
    with pytest.raises(InvalidArgument, match="idle_ttl must be between 0"):
        client.create_session("elnino", ttl=-1)
    with pytest.raises(InvalidArgument, match="idle_ttl must be between 0"):
        client.create_session("elnino", ttl=timedelta(days=365 * 100))
    with pytest.raises(InvalidArgument, match="session_id must be"):
        client.create_session("elnino", session_id="no spaces please")
    with pytest.raises(NotFound, match="unknown model"):
        client.create_session("nope")
    a.close()
    b.close()


async def test_async_client_is_the_twin(server: RunningServer) -> None:
    g = golden("golden_l3_head")
    async with AsyncClient(server.target) as client:
        assert "golden_l3_head" in {m.name for m in await client.list_models()}
        expected = (await client.predict("golden_l3_head", g.inputs[1])).outputs
        async with await client.create_session("golden_l3_head") as session:
            first = await session.step(g.inputs[1, :3])
            rest = [y async for y in session.stream(g.inputs[1, 3:])]
            np.testing.assert_allclose(np.concatenate([first, np.stack(rest)]), expected, atol=TOLERANCE, rtol=0)
            assert (await session.info()).steps == 11
            await session.reset()
            attached = await client.session(session.id)
            assert attached.seq == session.seq == 1 + 8
        with pytest.raises(SessionGone):
            await client.session_info(session.id)
