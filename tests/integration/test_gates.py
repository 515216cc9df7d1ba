"""Steps with their gates (issue 13), through the real client and server: the values are PyTorch's (a committed
fixture, tests/fixtures/make_gate_golden.py) and a float64 reference's, for an npz model, the normalised El Nino model
and an ONNX model; asking for them changes nothing else about the step."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from lstm_client import Client, SequenceError
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client.tensor import to_tensor
from tests.golden import FIXTURES, REPO
from tests.lstm_reference import ReferenceLstm
from tests.servers import RunningServer

GATES = ("forget", "input", "output", "candidate", "c", "h")


@pytest.fixture(scope="module")
def golden_gates() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "gate_golden.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize(("model", "npz"), [("golden_l3_head", FIXTURES / "golden_l3_head.npz"),
                                            ("elnino", REPO / "models" / "elnino" / "elnino.npz"),
                                            ("macro", None)])  # fmt: skip
@pytest.mark.parametrize("at_once", [False, True])
def test_gates_match_pytorch_and_a_float64_reference(
    client: Client, golden_gates: dict[str, np.ndarray], model: str, npz: object, at_once: bool
) -> None:
    g = {k.split(".", 1)[1]: v for k, v in golden_gates.items() if k.startswith(f"{model}.")}
    with client.create_session(model, h0=g["h0"], c0=g["c0"]) as session:
        if at_once:  # one request of T steps: gates [T, L, H]
            outputs, gates = session.step_with_gates(g["inputs"])
            assert gates is not None
            got = gates.as_dict()
        else:
            steps = [session.step_with_gates(x) for x in g["inputs"]]
            outputs = np.stack([y for y, _ in steps])
            assert all(gates is not None and gates.forget.shape[0] == 1 for _, gates in steps)
            got = {name: np.concatenate([getattr(gates, name) for _, gates in steps]) for name in GATES}
    for name in GATES:
        assert got[name].shape == g[name].shape, name
        np.testing.assert_allclose(got[name], g[name], atol=2e-5, rtol=0, err_msg=f"{model} {name} vs PyTorch")
    np.testing.assert_allclose(outputs, g["y"], atol=1e-4, rtol=0)
    for name in ("forget", "input", "output"):
        assert ((got[name] > 0) & (got[name] < 1)).all()
    if isinstance(npz, type(FIXTURES)):
        ref = ReferenceLstm.from_npz(npz)
        h, c = g["h0"].astype(np.float64), g["c0"].astype(np.float64)
        for t, x in enumerate(g["inputs"]):
            _, h, c, expected = ref.step(x, h, c)
            for name in GATES:
                np.testing.assert_allclose(got[name][t], expected[name], atol=2e-5, rtol=0, err_msg=f"{name} t={t}")


def test_asking_for_gates_changes_nothing_else(client: Client) -> None:
    """The same outputs, state and seq as a plain step, bit for bit; a retry replays without gates."""
    xs = np.random.default_rng(4).standard_normal((6, 4)).astype(np.float32)
    with client.create_session("golden_l3_head") as plain, client.create_session("golden_l3_head") as gated:
        for x in xs[:3]:
            y, gates = gated.step_with_gates(x)
            assert gates is not None
            assert np.array_equal(y, plain.step(x))
        assert gated.info().seq == plain.info().seq == 3
        for x in xs[3:]:  # the state committed with gates is the plain one
            last = gated.step(x)
            assert np.array_equal(last, plain.step(x))
        # a retry of the last step, with gates asked: the stored reply, without gates
        gated.seq -= 1
        y, gates = gated.step_with_gates(xs[-1])
        assert gates is None
        assert np.array_equal(y, last)
        gated.seq -= 1
        with pytest.raises(SequenceError) as caught:
            gated.step_with_gates(xs[0])
        assert caught.value.reason == "retry_mismatch"
        assert gated.info().seq == 6


def test_the_last_layer_h_is_what_the_head_reads(client: Client) -> None:
    """A model without a head outputs its top layer's h: the gates' h of the last layer must be that output."""
    xs = np.random.default_rng(6).standard_normal((5, 3)).astype(np.float32)
    with client.create_session("golden_l1_nohead") as session:
        y, gates = session.step_with_gates(xs)
        assert gates is not None
        np.testing.assert_allclose(gates.h[:, -1], y, atol=1e-6, rtol=0)
        # and c, h follow from the gates: c_t = f c_{t-1} + i g, h_t = o tanh(c_t)
        c_prev = np.concatenate([np.zeros((1, 1, 5), np.float32), gates.c[:-1]])
        np.testing.assert_allclose(gates.c, gates.forget * c_prev + gates.input * gates.candidate, atol=1e-6)
        np.testing.assert_allclose(gates.h, gates.output * np.tanh(gates.c), atol=1e-6)


def test_stream_steps_refuse_gates_in_band(server: RunningServer, client: Client) -> None:
    with client.create_session("elnino") as session, grpc.insecure_channel(server.target) as channel:
        stub = lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]
        requests = [
            lstm_pb2.StepRequest(session_id=session.id, seq=1, inputs=to_tensor([25.0]), with_gates=True),
            lstm_pb2.StepRequest(session_id=session.id, seq=1, inputs=to_tensor([25.0])),
        ]
        replies = list(stub.StreamSteps(iter(requests), timeout=10))
        assert replies[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "Step only" in replies[0].error.message
        assert not replies[1].HasField("error")  # the stream goes on; the refused request applied nothing
        assert session.info().seq == 1
