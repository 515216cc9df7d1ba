"""Fork, export / import and initial state (issue 13), through the real client and servers (memory and Redis stores):
a fork or an import continues exactly as the original would (bit for bit), and a blob that is foreign, corrupt,
truncated or of another model is refused with its reason and creates nothing."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from lstm_client import AlreadyExists, Client, InvalidArgument, NotFound, StateMismatch
from tests.golden import FIXTURES, TOLERANCE, golden
from tests.procs import RedisServer
from tests.servers import RunningServer, model_repository, start_server, stop_server, test_settings

MAGIC = b"\x89LSTMST\n"  # docs/api.md: the layout of a session state blob


def _blob(header: dict[str, object], state: bytes, *, version: int = 1, magic: bytes = MAGIC) -> bytes:
    """A blob built by hand from the documented layout (not with the server's code)."""
    meta = json.dumps(header).encode()
    body = magic + struct.pack("<HI", version, len(meta)) + meta + state
    return body + hashlib.sha256(body).digest()


def _parse(blob: bytes) -> tuple[dict[str, object], bytes]:
    assert blob[:8] == MAGIC
    version, length = struct.unpack_from("<HI", blob, 8)
    assert version == 1
    assert hashlib.sha256(blob[:-32]).digest() == blob[-32:]
    return json.loads(blob[14 : 14 + length]), blob[14 + length : -32]


@pytest.fixture(scope="module")
def other_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A second server with the same models, except golden_l3_head: same name and shapes, other weights."""
    root = model_repository(tmp_path_factory.mktemp("other_models"))
    with np.load(FIXTURES / "golden_l3_head.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["lstm.0.W_ih"] = arrays["lstm.0.W_ih"] * np.float32(1.01)
    np.savez(root / "golden_l3_head" / "golden_l3_head.npz", **arrays)
    running, handle = start_server(test_settings(root))
    yield running
    stop_server(running, handle)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as redis:
        root = model_repository(tmp_path_factory.mktemp("redis_models"))
        running, handle = start_server(test_settings(root, store=redis.url))
        yield running
        stop_server(running, handle)


def _inputs(n: int, size: int, seed: int) -> np.ndarray:
    return (25.0 + np.random.default_rng(seed).standard_normal((n, size))).astype(np.float32)


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_fork_continues_exactly_as_the_original(
    store: str, server: RunningServer, redis_server: RunningServer
) -> None:
    running = server if store == "memory" else redis_server
    xs = _inputs(10, 1, 1)
    with running.client() as client, client.create_session("elnino") as original:
        original.step(xs[:5])
        before = original.info()
        with original.fork(new_session_id=f"branch-{store}", ttl=60) as branch:
            assert (branch.id, branch.seq) == (f"branch-{store}", 0)
            assert original.info().seq == before.seq  # the original is untouched
            ours = [original.step(x) for x in xs[5:]]
            theirs = [branch.step(x) for x in xs[5:]]
            assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))
            with pytest.raises(AlreadyExists):
                client.fork_session(original.id, new_session_id=branch.id)
        with pytest.raises(NotFound):
            client.fork_session("no-such-session")


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_an_imported_state_continues_exactly_on_another_server(
    store: str, server: RunningServer, redis_server: RunningServer, other_server: RunningServer
) -> None:
    source = server if store == "memory" else redis_server
    for model, size in (("elnino", 1), ("macro", 4), ("golden_l2_wide", 6)):
        xs = _inputs(12, size, 2)
        with source.client() as a, other_server.client() as b, a.create_session(model) as original:
            original.step(xs[:7])
            blob = original.export_state()
            header, state = _parse(blob)
            info = a.get_model(model)
            assert header["model"] == model
            assert header["seq"] == 1
            assert header["steps"] == 7
            assert header["dtype"] == "<f4"
            assert (header["num_layers"], header["hidden_size"]) == (
                info.num_layers,
                info.hidden_size,
            )
            assert len(state) == 2 * info.num_layers * info.hidden_size * 4
            with b.import_session(blob, session_id=f"moved-{model}-{store}") as moved, a.import_session(blob) as back:
                assert moved.seq == back.seq == 0
                expected = original.step(xs[7:])
                assert np.array_equal(moved.step(xs[7:]), expected)  # on another server
                assert np.array_equal(back.step(xs[7:]), expected)  # and on the one it came from


def test_initial_state_matches_pytorch(client: Client) -> None:
    g = golden("golden_l3_head")
    for b in range(g.inputs.shape[0]):
        with client.create_session("golden_l3_head", h0=g.h0[:, b], c0=g.c0[:, b]) as session:
            np.testing.assert_allclose(session.step(g.inputs[b]), g.outputs[b], atol=TOLERANCE, rtol=0)
    with client.create_session("golden_l3_head", h0=g.h0[:, 0]) as half:  # c0 zeros
        p = client.predict("golden_l3_head", g.inputs[0], h0=g.h0[:, 0])
        np.testing.assert_allclose(half.step(g.inputs[0]), p.outputs, atol=1e-6, rtol=0)


def test_a_bad_initial_state_is_refused_and_creates_nothing(client: Client) -> None:
    for kwargs, reason in (
        ({"h0": np.zeros((2, 8), np.float32)}, r"h0 must have shape \[3, 8\]"),
        ({"c0": np.full((3, 8), np.nan, np.float32)}, "c0 contains NaN or Inf"),
        ({"h0": np.full((3, 8), np.inf, np.float32)}, "h0 contains NaN or Inf"),
    ):
        with pytest.raises(InvalidArgument, match=reason):
            client.create_session("golden_l3_head", session_id="bad-initial", **kwargs)  # type: ignore[arg-type]
        with pytest.raises(NotFound):
            client.session_info("bad-initial")


def test_foreign_corrupt_truncated_and_mismatched_blobs_are_refused(
    server: RunningServer, other_server: RunningServer
) -> None:
    with server.client() as client, client.create_session("golden_l3_head") as session:
        session.step(_inputs(3, 4, 3))
        blob = session.export_state()
        header, state = _parse(blob)
        flipped = bytearray(blob)
        flipped[len(blob) // 2] ^= 0x01
        refusals: list[tuple[bytes, type[Exception], str]] = [
            (b"", InvalidArgument, "not an lstm-serve session state"),
            (b"GIF89a" + bytes(200), InvalidArgument, "not an lstm-serve session state"),
            (blob[:20], InvalidArgument, "truncated"),
            (blob[:-1], InvalidArgument, "corrupt or truncated"),
            (blob + b"\x00", InvalidArgument, "corrupt or truncated"),
            (bytes(flipped), InvalidArgument, "corrupt or truncated"),
            (_blob(header, state, version=2), InvalidArgument, "format version 2"),
            (_blob({**header, "dtype": "<f8"}, state), InvalidArgument, "dtype"),
            (_blob({**header, "seq": "x"}, state), InvalidArgument, "seq has an invalid value"),
            (_blob({"model": "golden_l3_head"}, state), InvalidArgument, "lacks"),
            (_blob(header, state[:-4]), InvalidArgument, "header declares"),
            (_blob(header, np.full(len(state) // 4, np.nan, "<f4").tobytes()), InvalidArgument, "NaN or Inf"),
            (_blob({**header, "fingerprint": "0" * 64}, state), StateMismatch, "other weights"),
            (_blob({**header, "model": "nope"}, state), StateMismatch, "does not serve"),
            (_blob({**header, "hidden_size": 4}, state[: len(state) // 2]), StateMismatch, "has 3 of 8"),
        ]
        for bad, error, reason in refusals:
            with pytest.raises(error, match=reason):
                client.import_session(bad, session_id="refused")
            with pytest.raises(NotFound):
                client.session_info("refused")
    with other_server.client() as other:  # same name and shapes, other weights: refused by their fingerprint
        with pytest.raises(StateMismatch, match="other weights of model 'golden_l3_head'") as caught:
            other.import_session(blob)
        assert caught.value.reason == "state_mismatch"


def test_import_with_a_taken_id_is_refused(client: Client) -> None:
    with client.create_session("elnino", session_id="taken-id") as session:
        blob = session.export_state()
        with pytest.raises(AlreadyExists):
            client.import_session(blob, session_id="taken-id")


def test_export_of_a_missing_session(client: Client) -> None:
    with pytest.raises(NotFound):
        client.export_session("no-such-session")


def test_a_step_with_gates_commits_through_redis_like_a_plain_one(redis_server: RunningServer) -> None:
    xs = _inputs(4, 6, 7)
    with (
        redis_server.client() as client,
        client.create_session("golden_l2_wide") as plain,
        client.create_session("golden_l2_wide") as gated,
    ):
        for x in xs:
            y, gates = gated.step_with_gates(x)
            assert gates is not None
            assert gates.forget.shape == (1, 2, 16)
            assert np.array_equal(y, plain.step(x))
        assert gated.info().seq == 4
        assert _parse(gated.export_state())[1] == _parse(plain.export_state())[1]  # the same state, bit for bit
