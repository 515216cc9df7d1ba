"""Model versions and their lifecycle on a real server: the version policy, sessions pinned to the version they were
created on, load / unload / reload through the lstm.v1.ModelAdminService RPCs (admin credentials required), the file
watch, a failed reload that keeps the loaded version serving, and a reload under load that loses no step.

Every output is checked against a float64 LSTM written here from the npz arrays (not the server's cell), run over the
session's whole history: a step lost, applied twice, or applied by the wrong version would change every later output.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_client import Client
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client.errors import NotFound, SessionGone, Unauthenticated
from lstm_serve.service.admin import is_loopback
from lstm_serve.service.auth import token_hash
from tests.golden import FIXTURES
from tests.procs import health_status
from tests.servers import RunningServer, start_server, stop_server, test_settings

BASE = FIXTURES / "golden_l3_head.npz"  # 4 inputs -> 3 x LSTM(8) -> 2 outputs
ATOL = 1e-4


def write_weights(path: Path, scale: float) -> Path:
    """A model of BASE's shape whose recurrent weights are scaled by `scale`: another version, other outputs."""
    with np.load(BASE) as z:
        arrays = {k: z[k] for k in z.files}
    for key in arrays:
        if key.endswith("W_hh"):
            arrays[key] = (arrays[key] * scale).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, allow_pickle=False, **arrays)
    return path


def write_version(model_dir: Path, version: int | None, scale: float) -> Path:
    """models/<m>/<version>/ (None: the flat layout, model.toml in the model's directory), written beside and renamed
    into place, as an operator's deploy would, so a watcher never sees half of it."""
    target = model_dir if version is None else model_dir / str(version)
    staging = model_dir.parent.parent / f"staging-{model_dir.name}-{version}"  # outside the repository
    staging.mkdir(parents=True)
    write_weights(staging / "m.npz", scale)
    (staging / "model.toml").write_text('weights = "m.npz"\n' + (f"version = {version}\n" if version else ""))
    if version is None:
        target.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            item.rename(target / item.name)
        staging.rmdir()
    else:
        model_dir.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
    return target / "m.npz"


def _sigmoid(v: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-v))
    return out


class Reference:
    """The LSTM in float64 from an npz's arrays (PyTorch's gate order i, f, g, o), stepped one input at a time."""

    def __init__(self, weights: Path) -> None:
        with np.load(weights) as z:
            self.a = {k: z[k].astype(np.float64) for k in z.files}
        self.layers = sum(1 for k in self.a if k.endswith(".W_ih"))
        hidden = self.a["lstm.0.W_hh"].shape[1]
        self.h = np.zeros((self.layers, hidden))
        self.c = np.zeros((self.layers, hidden))

    def step(self, x: np.ndarray) -> np.ndarray:
        inp = np.asarray(x, np.float64)
        for k in range(self.layers):
            z = self.a[f"lstm.{k}.W_ih"] @ inp + self.a[f"lstm.{k}.b_ih"]
            z = z + self.a[f"lstm.{k}.W_hh"] @ self.h[k] + self.a[f"lstm.{k}.b_hh"]
            i, f, g, o = np.split(z, 4)
            self.c[k] = _sigmoid(f) * self.c[k] + _sigmoid(i) * np.tanh(g)
            self.h[k] = _sigmoid(o) * np.tanh(self.c[k])
            inp = self.h[k]
        out: np.ndarray = self.a["head.W"] @ inp + self.a["head.b"]
        return out


def _tokens(path: Path, entries: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}:{token_hash(token)}\n" for name, token in entries.items()))
    return path


@contextmanager
def serving(model_dir: Path, **overrides: object) -> Iterator[RunningServer]:
    server, handle = start_server(test_settings(model_dir, **overrides))
    try:
        yield server
    finally:
        stop_server(server, handle)


def admin(
    server: RunningServer, method: str, token: str | None = None, **fields: object
) -> lstm_pb2.ModelAdminResponse:
    requests = {
        "ReloadModels": lstm_pb2.ReloadModelsRequest,
        "LoadModel": lstm_pb2.LoadModelRequest,
        "UnloadModel": lstm_pb2.UnloadModelRequest,
    }
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(server.target) as channel:
        stub = lstm_pb2_grpc.ModelAdminServiceStub(channel)  # type: ignore[no-untyped-call]
        reply: lstm_pb2.ModelAdminResponse = getattr(stub, method)(
            requests[method](**fields), timeout=30, metadata=metadata
        )
        return reply


def versions(client: Client) -> dict[int, tuple[str, bool]]:
    return {int(m.version): (m.state, m.latest) for m in client.list_models() if m.name == "m"}


def wait_for(condition: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- the repository and the version policy ---------------------------------------------------------------------------


def test_flat_layout_is_version_1_and_the_policy_picks_what_is_served(tmp_path: Path) -> None:
    m = tmp_path / "models" / "m"
    v1 = write_version(m, None, 1.0)  # the layout from before versions
    v3 = write_version(m, 3, 0.5)
    x = np.linspace(-1, 1, 4, dtype=np.float32)
    with serving(tmp_path / "models") as server, server.client() as client:
        assert versions(client) == {3: ("ready", True)}  # latest:1
        session = client.create_session("m")
        assert session.info().model_version == 3
        np.testing.assert_allclose(session.step(x), Reference(v3).step(x), atol=ATOL)
        with pytest.raises(NotFound, match="no version 1 served"):
            client.create_session("m", model_version=1)
    with serving(tmp_path / "models", version_policy="all") as server, server.client() as client:
        assert versions(client) == {1: ("ready", False), 3: ("ready", True)}
        old = client.create_session("m", model_version=1)
        assert old.info().model_version == 1
        np.testing.assert_allclose(old.step(x), Reference(v1).step(x), atol=ATOL)
        assert client.get_model("m", version=1).version == "1"
    (m / "model.toml").write_text('weights = "m.npz"\nversion_policy = "specific:1"\n')  # the model's own policy wins
    with serving(tmp_path / "models", version_policy="all") as server, server.client() as client:
        assert versions(client) == {1: ("ready", True)}


# --- admin credentials -----------------------------------------------------------------------------------------------


def test_admin_rpcs_are_refused_without_admin_credentials(tmp_path: Path) -> None:
    write_version(tmp_path / "models" / "m", 1, 1.0)
    models = tmp_path / "models"
    with serving(models) as server:  # no admin configured: refused, whoever asks
        with pytest.raises(grpc.RpcError) as refused:
            admin(server, "ReloadModels")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "--admin-tokens-file" in (refused.value.details() or "")
    tokens = _tokens(tmp_path / "tokens", {"alice": "alice-token"})
    admins = _tokens(tmp_path / "admins", {"ops": "ops-token"})
    with serving(models, tokens_file=tokens, admin_tokens_file=admins) as server:
        with pytest.raises(grpc.RpcError) as no_token:
            admin(server, "ReloadModels")
        assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as tenant:
            admin(server, "UnloadModel", "alice-token", name="m")
        assert tenant.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with server.client(token="alice-token") as client:
            assert versions(client) == {1: ("ready", True)}  # the refused unload changed nothing
        reply = admin(server, "ReloadModels", "ops-token")
        assert [(m.name, m.version, m.state) for m in reply.models] == [("m", "1", "ready")]
        with pytest.raises(Unauthenticated), server.client(token="ops-token") as client:
            client.list_models()  # an admin token is not a tenant's
    with serving(models, admin_loopback=True) as server:  # local development: loopback callers, no token
        assert admin(server, "ReloadModels").models[0].name == "m"


def test_loopback_means_loopback() -> None:
    assert is_loopback("ipv4:127.0.0.1:5000")
    assert is_loopback("ipv6:[::1]:5000")
    assert not is_loopback("ipv4:10.0.0.7:5000")
    assert not is_loopback("ipv6:[2001:db8::1]:5000")
    assert not is_loopback("unix:/tmp/socket")


def test_unload_drains_and_load_serves_again(tmp_path: Path) -> None:
    models = tmp_path / "models"
    v1 = write_version(models / "m", 1, 1.0)
    x = np.full(4, 0.3, np.float32)
    with serving(models, admin_loopback=True, version_drain_timeout=60) as server, server.client() as client:
        pinned = client.create_session("m")
        ref = Reference(v1)
        np.testing.assert_allclose(pinned.step(x), ref.step(x), atol=ATOL)
        reply = admin(server, "UnloadModel", name="m")
        assert any("retired" in c for c in reply.changes), reply.changes
        assert versions(client) == {1: ("unloading", False)}
        with pytest.raises(NotFound):
            client.create_session("m")  # no new sessions on a retired version
        np.testing.assert_allclose(pinned.step(x), ref.step(x), atol=ATOL)  # the pinned session goes on
        admin(server, "LoadModel", name="m")
        assert versions(client) == {1: ("ready", True)}
        np.testing.assert_allclose(pinned.step(x), ref.step(x), atol=ATOL)
        admin(server, "UnloadModel", name="m")
        pinned.close()  # the last pinned session: the memory store knows none is left, the version goes
        wait_for(lambda: versions(client) == {}, "the drained version to be dropped")
        with pytest.raises(grpc.RpcError) as unknown:
            admin(server, "UnloadModel", name="nope")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_retired_version_ends_its_sessions_at_the_drain_deadline(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_version(models / "m", 1, 1.0)
    with serving(models, admin_loopback=True, version_drain_timeout=0.5) as server, server.client() as client:
        session = client.create_session("m")
        session.step(np.zeros(4, np.float32))
        v2 = write_version(models / "m", 2, 0.5)
        admin(server, "ReloadModels")
        wait_for(lambda: 1 not in versions(client), "the deadline to drop version 1")
        with pytest.raises(SessionGone) as gone:
            session.step(np.zeros(4, np.float32))
        assert gone.value.reason == "model_retired"
        fresh = client.create_session("m")
        assert fresh.info().model_version == 2
        x = np.ones(4, np.float32)
        np.testing.assert_allclose(fresh.step(x), Reference(v2).step(x), atol=ATOL)


# --- failed reloads, the file watch ----------------------------------------------------------------------------------


def test_a_failed_reload_leaves_the_old_version_serving(tmp_path: Path) -> None:
    models = tmp_path / "models"
    v1 = write_version(models / "m", 1, 1.0)
    x = np.linspace(0, 1, 4, dtype=np.float32)
    with serving(models, admin_loopback=True) as server, server.client() as client:
        session = client.create_session("m")
        ref = Reference(v1)
        np.testing.assert_allclose(session.step(x), ref.step(x), atol=ATOL)
        broken = models / "m" / "2"
        broken.mkdir()
        (broken / "model.toml").write_text('weights = "m.npz"\n')
        (broken / "m.npz").write_bytes(b"PK\x03\x04 not really a zip")
        reply = admin(server, "ReloadModels")
        assert versions(client) == {1: ("ready", True)}
        assert [(f.name, f.version) for f in reply.failures] == [("m/2", 2)]
        assert client.create_session("m").info().model_version == 1
        # version 1's own files broken in place: the copy loaded before keeps serving
        v1.write_bytes(b"garbage")
        reply = admin(server, "ReloadModels")
        assert any("failed to reload" in c for c in reply.changes), reply.changes
        assert {f.name for f in reply.failures} == {"m/1", "m/2"}
        np.testing.assert_allclose(session.step(x), ref.step(x), atol=ATOL)
        (models / "m" / "1" / "model.toml").write_text("weights = [unterminated\n")  # its model.toml broken too
        reply = admin(server, "ReloadModels")
        assert versions(client) == {1: ("ready", True)}
        assert "invalid TOML" in {f.name: f.error for f in reply.failures}["m/1"]
        np.testing.assert_allclose(session.step(x), ref.step(x), atol=ATOL)
        shutil.rmtree(broken)
        write_version(models / "m", 2, 0.5)
        reply = admin(server, "ReloadModels")
        assert versions(client) == {1: ("unloading", False), 2: ("ready", True)}
        np.testing.assert_allclose(session.step(x), ref.step(x), atol=ATOL)  # still pinned to version 1


def test_the_file_watch_picks_up_a_new_version(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_version(models / "m", 1, 1.0)
    with serving(models, model_poll_interval=0.1) as server, server.client() as client:
        assert versions(client) == {1: ("ready", True)}
        v2 = write_version(models / "m", 2, 0.5)
        wait_for(lambda: versions(client).get(2) == ("ready", True), "the watch to load version 2")
        x = np.ones(4, np.float32)
        with client.create_session("m") as session:
            np.testing.assert_allclose(session.step(x), Reference(v2).step(x), atol=ATOL)
        assert health_status(server.target, "lstm.v1.LstmService/m") == "SERVING"  # readiness per model
        assert health_status(server.target, "lstm.v1.LstmService/nope") == "NOT_FOUND"


# --- reload under load -----------------------------------------------------------------------------------------------


def test_reload_under_load_loses_no_step_of_pinned_sessions(tmp_path: Path) -> None:
    """8 sessions, each driven by its own thread (half over StreamSteps, half by unary Step), while version 2 is
    loaded and version 1 retired: every reply equals the float64 reference of version 1 over the session's whole
    history, and the server's seq and step counts end exactly at the number of steps sent."""
    models = tmp_path / "models"
    v1 = write_version(models / "m", 1, 1.0)
    sessions, steps = 8, 60
    rng = np.random.default_rng(7)
    inputs = rng.standard_normal((sessions, steps, 4)).astype(np.float32)
    failures: list[str] = []
    progress = [0] * sessions
    with serving(models, admin_loopback=True, version_drain_timeout=60) as server:
        with server.client() as client:
            created = [client.create_session("m") for _ in range(sessions)]
            assert {s.info().model_version for s in created} == {1}
            ids = [s.id for s in created]

        def paced(i: int) -> Iterator[np.ndarray]:
            for t in range(steps):
                yield inputs[i, t]
                time.sleep(0.003)

        def drive(i: int) -> None:
            ref = Reference(v1)
            try:
                with server.client() as client:
                    session = client.session(ids[i])
                    replies = session.stream(paced(i)) if i % 2 else (session.step(x) for x in paced(i))
                    for t, got in enumerate(replies):
                        want = ref.step(inputs[i, t])
                        if not np.allclose(got, want, atol=ATOL):
                            failures.append(f"session {i} step {t + 1}: {got} != {want}")
                            return
                        progress[i] = t + 1
                    info = session.info()
                    if (info.seq, info.steps, info.model_version) != (steps, steps, 1):
                        failures.append(f"session {i}: {info}")
            except Exception as exc:  # reported by the main thread
                failures.append(f"session {i}: {exc!r}")

        workers = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(sessions)]
        for w in workers:
            w.start()
        wait_for(lambda: min(progress) >= 10 or bool(failures), "the sessions to get going", timeout=60)
        v2 = write_version(models / "m", 2, 0.5)
        reply = admin(server, "ReloadModels")  # version 2 in, version 1 retired while its sessions step
        assert any("version 2 loaded" in c for c in reply.changes), reply.changes
        reloaded_at = min(progress)
        with server.client() as client:
            assert versions(client) == {1: ("unloading", False), 2: ("ready", True)}
            new = client.create_session("m")
            x = np.full(4, -0.5, np.float32)
            assert new.info().model_version == 2
            np.testing.assert_allclose(new.step(x), Reference(v2).step(x), atol=ATOL)
        for w in workers:
            w.join(120)
        assert not any(w.is_alive() for w in workers)
        assert failures == []
        assert progress == [steps] * sessions
        assert reloaded_at < steps  # the reload happened while they were stepping
        with server.client() as client:
            for session_id in ids:
                client.session(session_id).close()
            wait_for(lambda: 1 not in versions(client), "version 1 to go once its sessions ended")
            assert versions(client) == {2: ("ready", True)}
