"""lstm-client's behaviour on whatever protobuf / grpcio / numpy are installed: `make client-compat` runs this module
in fresh venvs with the lowest and the highest versions client/pyproject.toml allows (and beside tritonclient), against
an lstm-serve subprocess (LSTM_COMPAT_TARGET). There it imports nothing but lstm_client, grpc, numpy and pytest, and
no conftest. In `make test` it runs against a server of the test suite, with the versions of .venv."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import __version__ as protobuf_version

import lstm_client
from lstm_client import AsyncClient, Client, SequenceError, SessionGone

GOLDEN = np.load(Path(__file__).resolve().parents[1] / "fixtures" / "golden_l3_head.io.npz")
MODEL = "golden_l3_head"
TOLERANCE = 1e-5  # float32 against PyTorch's float64 reference (tests/golden.py)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("LSTM_COMPAT_TARGET")
    if given:
        yield given
        return
    from tests.servers import model_repository, start_server, stop_server, test_settings  # the main venv only

    server, handle = start_server(test_settings(model_repository(tmp_path_factory.mktemp("models"))))
    yield server.target
    stop_server(server, handle)


def test_versions_in_use() -> None:
    """Names what ran (in the output with -rA) and that the installed lstm_client, not the source tree, is tested."""
    print(f"protobuf {protobuf_version}, grpcio {grpc.__version__}, numpy {np.__version__}, {lstm_client.__file__}")
    if os.environ.get("LSTM_COMPAT_TARGET"):
        assert "site-packages" in lstm_client.__file__
    with warnings.catch_warnings():  # the generated code warns on a grpcio older than its generator; none here
        warnings.simplefilter("error")
        import importlib

        from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc

        importlib.reload(lstm_pb2)
        importlib.reload(lstm_pb2_grpc)


def test_predict_matches_the_reference(target: str) -> None:
    with Client(target) as client:
        for b in range(GOLDEN["inputs"].shape[0]):
            p = client.predict(MODEL, GOLDEN["inputs"][b], h0=GOLDEN["h0"][:, b], c0=GOLDEN["c0"][:, b])
            np.testing.assert_allclose(p.outputs, GOLDEN["outputs"][b], atol=TOLERANCE, rtol=0)
            np.testing.assert_allclose(p.h, GOLDEN["hn"][:, b], atol=TOLERANCE, rtol=0)


def test_sessions_step_and_stream_like_predict(target: str) -> None:
    xs = GOLDEN["inputs"][0]
    with Client(target) as client:
        whole = client.predict(MODEL, xs).outputs
        with client.create_session(MODEL) as session:
            one_by_one = np.stack([session.step(x) for x in xs[:3]])
            streamed = np.stack(list(session.stream(xs[3:])))
            assert session.info().seq == len(xs)
    np.testing.assert_allclose(np.concatenate([one_by_one, streamed]), whole, atol=TOLERANCE, rtol=0)


def test_errors_arrive_with_their_details(target: str) -> None:
    with Client(target) as client:
        session = client.create_session(MODEL)
        session.step(GOLDEN["inputs"][0, 0])
        session.seq = 9
        with pytest.raises(SequenceError) as caught:
            session.step(GOLDEN["inputs"][0, 1])
        assert caught.value.expected_seq == 2
        assert caught.value.metadata["session_id"] == session.id  # only in google.rpc.ErrorInfo
        session.seq = 1
        session.close()
        with pytest.raises(SessionGone) as gone:
            session.step(GOLDEN["inputs"][0, 1])
        assert gone.value.reason == "closed"


async def test_the_async_client(target: str) -> None:
    xs = GOLDEN["inputs"][1]
    async with AsyncClient(target) as client:
        info = await client.server_info()
        assert info.protocol == "lstm.v1"
        async with await client.create_session(MODEL) as session:
            ys = [await session.step(x) for x in xs]
    with Client(target) as sync:
        np.testing.assert_allclose(np.stack(ys), sync.predict(MODEL, xs).outputs, atol=TOLERANCE, rtol=0)
