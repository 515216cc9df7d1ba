"""Security (docs/security.md), proven against real servers on 127.0.0.1 with real clients: TLS and mutual TLS with
certificates made at test time (tests/certs.py) and re-read when replaced, bearer tokens mapped to tenants, sessions
kept apart per tenant (another tenant's id answers exactly like one that never existed), sessions and requests
limited per tenant, and the command-line tools (`lstm-serve health`, `lstm-loadtest`) speaking TLS and tokens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lstm_client import (
    AlreadyExists,
    AsyncClient,
    Client,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    SequenceError,
    SessionGone,
    TlsConfig,
    Unauthenticated,
    Unavailable,
)
from lstm_client.client import DEFAULT_OPTIONS, Session
from lstm_client.errors import ERROR_METADATA_KEY
from lstm_client.loadtest import cli as loadtest_cli
from lstm_client.tls import auth_metadata
from lstm_serve.service.auth import token_hash
from tests.certs import Ca, Issued
from tests.procs import LstmServeProcess, RedisServer, free_port
from tests.servers import RunningServer, model_repository, start_server, stop_server, test_settings

NO_RETRY = RetryPolicy(budget=0)
MODEL = "elnino"
TOKENS = {"alice": "alice-token-7f3a9c", "bob": "bob-token-51e2d8"}
FRESH = [*DEFAULT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, never a shared one
LSTM_SERVE = [sys.executable, "-m", "lstm_serve.cli"]


@dataclass(frozen=True)
class Pki:
    ca: Ca
    server: Issued
    client: Issued
    other_ca: Ca  # trusted by nobody
    other_server: Issued  # signed by other_ca
    other_client: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other = Ca.make(root / "ca"), Ca.make(root / "other", "other-ca")
    return Pki(
        ca=ca,
        server=ca.issue("server", server=True),
        client=ca.issue("client", server=False),
        other_ca=other,
        other_server=other.issue("server", server=True),
        other_client=other.issue("client", server=False),
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_repository(tmp_path_factory.mktemp("models"))


def _tokens_file(path: Path, tokens: dict[str, str]) -> Path:
    lines = ["# tenant:sha256 of the token", *(f"{tenant}:{token_hash(token)}" for tenant, token in tokens.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def serving(models: Path, **overrides: object) -> Iterator[RunningServer]:
    server, handle = start_server(test_settings(models, **overrides))
    try:
        yield server
    finally:
        stop_server(server, handle)


def _tls(pki: Pki, *, client_cert: Issued | None = None, ca: Path | None = None) -> TlsConfig:
    cert = client_cert
    return TlsConfig(ca=ca or pki.ca.cert, cert=cert.cert if cert else None, key=cert.key if cert else None)


def _works(target: str, **kwargs: object) -> None:
    with Client(target, retry=NO_RETRY, options=FRESH, **kwargs) as client:  # type: ignore[arg-type]
        assert MODEL in {m.name for m in client.list_models()}


def _refused(target: str, error: type[Exception] = Unavailable, **kwargs: object) -> Exception:
    client = Client(target, retry=NO_RETRY, timeout=5, options=FRESH, **kwargs)  # type: ignore[arg-type]
    with client, pytest.raises(error) as err:
        client.list_models()
    return err.value


# --- TLS ------------------------------------------------------------------------------------------------------------


def test_tls_refuses_plaintext_and_serves_tls_clients(models: Path, pki: Pki) -> None:
    with serving(models, tls_cert=pki.server.cert, tls_key=pki.server.key) as server:
        _refused(server.target)  # plaintext against TLS: the handshake fails
        _refused(server.target, tls=_tls(pki, ca=pki.other_ca.cert))  # a server certificate we do not trust
        with Client(server.target, tls=_tls(pki), retry=NO_RETRY) as client, client.create_session(MODEL) as session:
            assert session.step([0.5]).shape == (1,)
            assert list(session.stream([[0.1], [0.2]]))[1].shape == (1,)
        # the PEM text itself, and ready-made credentials, do as well as file names
        _works(server.target, tls=TlsConfig(ca=pki.ca.cert.read_bytes()))
        _works(server.target, credentials=grpc.ssl_channel_credentials(pki.ca.cert.read_bytes()))

        async def async_client() -> None:
            async with AsyncClient(server.target, tls=_tls(pki), retry=NO_RETRY) as client:
                session = await client.create_session(MODEL)
                assert (await session.step([0.5])).shape == (1,)
                await session.close()

        asyncio.run(async_client())


def test_mutual_tls_requires_a_client_certificate_of_the_client_ca(models: Path, pki: Pki) -> None:
    with serving(models, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert) as server:
        _refused(server.target)
        _refused(server.target, tls=_tls(pki))  # no client certificate
        _refused(server.target, tls=_tls(pki, client_cert=pki.other_client))  # one signed by another CA
        _works(server.target, tls=_tls(pki, client_cert=pki.client))

        health = [*LSTM_SERVE, "health", "--target", server.target, "--timeout", "5", "--tls-ca", str(pki.ca.cert)]
        with_cert = [*health, "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
        ok = subprocess.run(with_cert, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert "SERVING" in ok.stdout
        refused = subprocess.run(health, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1
        assert "UNAVAILABLE" in refused.stderr
        # the image's HEALTHCHECK runs a fixed command: its TLS options come from the environment
        env = os.environ | {
            "LSTM_SERVE_HEALTH_TLS_CA": str(pki.ca.cert),
            "LSTM_SERVE_HEALTH_TLS_CERT": str(pki.client.cert),
            "LSTM_SERVE_HEALTH_TLS_KEY": str(pki.client.key),
        }
        by_env = subprocess.run(
            [*LSTM_SERVE, "health", "--target", server.target, "--timeout", "5"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert by_env.returncode == 0, by_env.stderr


def test_replaced_certificates_serve_new_connections(models: Path, pki: Pki, tmp_path: Path) -> None:
    """The files are renamed over (as cert-manager or certbot do); the next connection gets the new certificate,
    and a broken replacement leaves the last good one in force."""
    cert, key = tmp_path / "tls.pem", tmp_path / "tls.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())

    def install(new_cert: bytes, new_key: bytes) -> None:
        for path, data in ((key, new_key), (cert, new_cert)):  # the key first; each one renamed over whole
            staged = path.with_suffix(".new")
            staged.write_bytes(data)
            os.replace(staged, path)

    with serving(models, tls_cert=cert, tls_key=key) as server:
        _works(server.target, tls=_tls(pki))
        install(pki.other_server.cert.read_bytes(), pki.other_server.key.read_bytes())
        _works(server.target, tls=_tls(pki, ca=pki.other_ca.cert))
        _refused(server.target, tls=_tls(pki))  # the old CA no longer vouches for what the server presents

        install(b"-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n", b"junk")
        _works(server.target, tls=_tls(pki, ca=pki.other_ca.cert))  # the last good certificate stays in force

        install(pki.server.cert.read_bytes(), pki.server.key.read_bytes())  # and a good one is taken again
        _works(server.target, tls=_tls(pki))


def test_unusable_certificate_files_stop_the_start_with_the_reason(models: Path, pki: Pki) -> None:
    with pytest.raises(RuntimeError) as err:
        start_server(test_settings(models, tls_cert=pki.server.cert, tls_key=pki.other_server.key))
    assert "not a PEM certificate chain and its private key" in str(err.value.__cause__)
    with pytest.raises(RuntimeError) as err:
        start_server(test_settings(models, tls_cert=pki.server.cert, tls_key=pki.server.cert.with_name("missing")))
    assert "cannot read" in str(err.value.__cause__)


# --- tokens ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authed(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tokens = _tokens_file(tmp_path_factory.mktemp("tokens") / "tokens", TOKENS)
    with serving(models, tokens_file=tokens) as server:
        yield server


def _client(server: RunningServer, tenant: str | None) -> Client:
    return Client(server.target, retry=NO_RETRY, token=TOKENS[tenant] if tenant else None)


def test_calls_without_a_valid_token_are_unauthenticated(authed: RunningServer) -> None:
    for token in (None, "wrong-token"):
        with Client(authed.target, retry=NO_RETRY, token=token) as client:
            with pytest.raises(Unauthenticated) as err:
                client.list_models()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert err.value.reason == "unauthenticated"
            with pytest.raises(Unauthenticated):
                client.create_session(MODEL)
    stranger = Client(authed.target, retry=NO_RETRY, token="wrong-token")
    with _client(authed, "alice") as alice, alice.create_session(MODEL) as session, stranger:
        # a step stream is refused the same way, and so is every other call about the session
        with pytest.raises(Unauthenticated):
            list(Session(stranger, session.info()).stream([[0.1]]))
        with pytest.raises(Unauthenticated):
            stranger.session_info(session.id)
    # a raw call with another scheme, or an empty bearer, is no better
    with grpc.insecure_channel(authed.target) as channel:
        list_models = channel.unary_unary("/lstm.v1.LstmService/ListModels", None, None)
        for value in ("Basic YWxpY2U6eA==", "Bearer ", TOKENS["alice"]):
            with pytest.raises(grpc.RpcError) as raw:
                list_models(b"", metadata=(("authorization", value),), timeout=5)
            assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert ERROR_METADATA_KEY in {item.key for item in raw.value.trailing_metadata() or ()}


def test_health_is_open_and_reflection_needs_a_token(authed: RunningServer) -> None:
    with grpc.insecure_channel(authed.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lstm.v1.LstmService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        with pytest.raises(grpc.RpcError) as err:
            list(reflect.ServerReflectionInfo(iter(ask), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        [listed] = reflect.ServerReflectionInfo(iter(ask), timeout=5, metadata=auth_metadata(TOKENS["bob"]))
        assert "lstm.v1.LstmService" in {s.name for s in listed.list_services_response.service}


def test_refusals_are_counted(authed: RunningServer) -> None:
    _refused(authed.target, Unauthenticated)
    import urllib.request

    with urllib.request.urlopen(authed.metrics_url, timeout=10) as response:
        text = response.read().decode()
    assert 'lstm_rpcs_total{code="UNAUTHENTICATED",method="ListModels"}' in text


def test_tokens_file_changes_are_picked_up(models: Path, tmp_path: Path) -> None:
    """Rotation without a restart: add the new token, move the clients, remove the old one."""
    path = _tokens_file(tmp_path / "tokens", {"alice": "old-token"})
    with serving(models, tokens_file=path) as server:
        _works(server.target, token="old-token")
        _refused(server.target, Unauthenticated, token="new-token")
        _tokens_file(path, {"alice": "new-token"})
        deadline = time.monotonic() + 10
        while True:  # the file is looked at once a second at most
            try:
                _works(server.target, token="new-token")
                break
            except Unauthenticated:
                assert time.monotonic() < deadline, "the new tokens file was not picked up"
                time.sleep(0.2)
        _refused(server.target, Unauthenticated, token="old-token")
        path.write_text("alice:not-a-hash\n")  # a broken file: logged, and the tokens in force stay
        time.sleep(1.2)
        _works(server.target, token="new-token")


def test_a_bad_tokens_file_stops_the_start(models: Path, tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"alice:{token_hash('x')}\nbob {token_hash('y')}\n")
    with pytest.raises(RuntimeError) as err:
        start_server(test_settings(models, tokens_file=path))
    assert f"{path}:2: expected 'tenant:sha256-hex'" in str(err.value.__cause__)


def test_the_documented_hash_command_matches(tmp_path: Path) -> None:
    """docs/security.md: `printf %s "$TOKEN" | sha256sum`."""
    result = subprocess.run(
        ["sh", "-c", 'printf %s "$TOKEN" | sha256sum'],
        capture_output=True,
        text=True,
        env=os.environ | {"TOKEN": TOKENS["alice"]},
        check=True,
    )
    assert result.stdout.split()[0] == token_hash(TOKENS["alice"])


# --- tenants --------------------------------------------------------------------------------------------------------


def test_another_tenants_session_is_exactly_an_unknown_one(authed: RunningServer) -> None:
    with _client(authed, "alice") as alice, _client(authed, "bob") as bob:
        mine = alice.create_session(MODEL, session_id="device-1")
        info = mine.info()
        assert info.session_id == "device-1"  # the client's id, never the stored key
        mine.step([0.3])
        x = np.array([[0.3]], np.float32)

        def refusals(session_id: str) -> list[tuple[type[Exception], str, str]]:
            theirs = Session(bob, info)
            theirs.id = session_id
            seen: list[tuple[type[Exception], str, str]] = []
            for attempt in (
                lambda: bob.session_info(session_id),
                lambda: theirs.step(x[0]),
                lambda: list(theirs.stream(x)),
                theirs.reset,
                theirs.close,
            ):
                with pytest.raises(NotFound) as err:
                    attempt()
                seen.append((type(err.value), err.value.reason, err.value.message.replace(session_id, "ID")))
            return seen

        # bob learns nothing: the answers for alice's id are those for an id nobody ever used
        assert refusals("device-1") == refusals("never-used")
        assert {reason for _, reason, _ in refusals("device-1")} == {"unknown_session"}
        assert mine.info().seq == 1  # and changed nothing

        mine.close()
        with pytest.raises(SessionGone) as gone:
            alice.session_info("device-1")
        assert gone.value.reason == "closed"  # alice learns how her session ended ...
        assert refusals("device-1") == refusals("never-used")  # ... bob still only "unknown"

        # the same id is free for every tenant, each session its own
        a = alice.create_session(MODEL, session_id="shared-name")
        b = bob.create_session(MODEL, session_id="shared-name")
        ya = a.step([1.0])
        assert b.info().seq == 0
        yb = b.step([1.0])
        np.testing.assert_array_equal(ya, yb)  # same model, same input: each session its own state
        a.step([1.0])
        assert (a.info().seq, b.info().seq) == (2, 1)
        a.close()
        b.close()


def test_error_messages_never_show_the_tenant(authed: RunningServer) -> None:
    with _client(authed, "alice") as alice:
        session = alice.create_session(MODEL, session_id="dev-9")
        session.step([0.1])
        session.seq = 5  # out of order
        with pytest.raises(SequenceError) as err:
            session.step([0.1])
        with pytest.raises(AlreadyExists) as exists:
            alice.create_session(MODEL, session_id="dev-9")
        session.close()
        with pytest.raises(SessionGone) as gone:
            session.resync()
    for exc in (err.value, exists.value, gone.value):
        assert "'dev-9'" in str(exc)
        assert "alice" not in str(exc)


# --- limits per tenant ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as redis:
        yield redis.url


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_sessions_per_tenant_are_limited_store_wide(
    models: Path, tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    options: dict[str, object] = {
        "tokens_file": _tokens_file(tmp_path / "tokens", TOKENS),
        "max_sessions_per_tenant": 2,
    }
    if store == "redis":
        options |= {"store": request.getfixturevalue("redis_url"), "store_prefix": f"tenants-{time.time_ns()}:"}
    with serving(models, **options) as server, _client(server, "alice") as alice, _client(server, "bob") as bob:
        first, _ = alice.create_session(MODEL), alice.create_session(MODEL, session_id="two")
        with pytest.raises(ResourceExhausted) as err:
            alice.create_session(MODEL, session_id="three")
        assert err.value.reason == "capacity"
        assert "per_tenant" in err.value.message
        assert bob.create_session(MODEL).info().seq == 0  # the other tenant's budget is its own
        first.close()
        alice.create_session(MODEL, session_id="three")  # a closed session gives its place back
        short = alice.session("three")
        short.close()
        alice.create_session(MODEL, session_id="four", ttl=0.3)
        time.sleep(0.6)  # an idle-expired session gives its place back too
        alice.create_session(MODEL, session_id="five")


def test_requests_per_tenant_are_rate_limited(models: Path, tmp_path: Path) -> None:
    tokens = _tokens_file(tmp_path / "tokens", TOKENS)
    with (
        serving(models, tokens_file=tokens, tenant_rate=1.0, tenant_burst=3) as server,
        _client(server, "alice") as alice,
        _client(server, "bob") as bob,
    ):
        outcomes = []
        for _ in range(6):
            try:
                alice.list_models()
                outcomes.append("ok")
            except ResourceExhausted as exc:
                outcomes.append(exc.reason)
        assert outcomes[:3] == ["ok"] * 3
        assert "rate_limited" in outcomes
        assert set(outcomes) == {"ok", "rate_limited"}
        bob.get_model(MODEL)  # bob's bucket is his own
        session = bob.create_session(MODEL)
        with pytest.raises(ResourceExhausted) as err:  # each request of a stream counts: answered in-band
            list(session.stream([[0.1]] * 4))
        assert err.value.reason == "rate_limited"


# --- the tools, and workers -----------------------------------------------------------------------------------------


def test_loadtest_speaks_tls_and_tokens(
    models: Path, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = _tokens_file(tmp_path / "tokens", TOKENS)
    with serving(models, tls_cert=pki.server.cert, tls_key=pki.server.key, tokens_file=tokens) as server:
        args = [server.target, "--model", MODEL, "--sessions", "2", "--steps", "5", "--json", "--verify"]
        assert loadtest_cli.main([*args, "--tls-ca", str(pki.ca.cert), "--token", TOKENS["alice"]]) == 0
        out = capsys.readouterr().out
        assert TOKENS["alice"] not in out
        assert json.loads(out)["result"]["errors"] == {}
        assert loadtest_cli.main([*args, "--tls-ca", str(pki.ca.cert), "--token", "wrong", "--retry-budget", "0"]) == 2
        assert "Unauthenticated" in capsys.readouterr().err


class _TlsServeProcess(LstmServeProcess):
    """Ready when the readiness service answers over TLS (the harness's own probe speaks plaintext)."""

    ca: Path

    def health(self, service: str = "lstm.v1.LstmService", timeout: float = 1.0) -> str:
        options = [("grpc.use_local_subchannel_pool", 1)]
        creds = grpc.ssl_channel_credentials(self.ca.read_bytes())
        with grpc.secure_channel(self.target, creds, options=options) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout
                )
            except grpc.RpcError as exc:
                return str(exc.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_workers_all_serve_tls(models: Path, pki: Pki, redis_url: str, tmp_path: Path) -> None:
    tls_args = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    args = ["--workers", "2", "--store", redis_url, "--store-prefix", f"workers-{free_port()}:", *tls_args]
    proc = _TlsServeProcess(models, *args, log_dir=tmp_path)
    proc.ca = pki.ca.cert
    with proc:
        for _ in range(8):  # fresh connections, spread by the kernel over both workers
            _works(proc.target, tls=_tls(pki))
            _refused(proc.target)


def test_client_options_are_checked(pki: Pki) -> None:
    with pytest.raises(ValueError, match="not both"):
        Client("127.0.0.1:1", tls=True, credentials=grpc.ssl_channel_credentials())
    with pytest.raises(ValueError, match="both cert and key"):
        TlsConfig(cert=pki.client.cert)
    with pytest.raises(ValueError, match="token"):
        Client("127.0.0.1:1", token="two words")
    with pytest.raises(FileNotFoundError):
        Client("127.0.0.1:1", tls=TlsConfig(ca=pki.ca.cert.with_name("missing.pem")))


def test_forks_exports_and_forecasts_keep_to_the_tenant(authed: RunningServer) -> None:
    """Issue 13: another tenant's session cannot be forked, exported or forecast from (it is an unknown one); a fork
    and an import belong to the caller's tenant."""
    with _client(authed, "alice") as alice, _client(authed, "bob") as bob:
        mine = alice.create_session(MODEL, session_id="fork-me")
        mine.step([25.0])
        rows = np.array([[25.5], [np.nan]], np.float32)
        for attempt in (
            lambda: bob.fork_session("fork-me"),
            lambda: bob.export_session("fork-me"),
            lambda: bob.forecast(rows, session_id="fork-me"),
        ):
            with pytest.raises(NotFound) as err:
                attempt()
            assert err.value.reason == "unknown_session"
        branch = alice.fork_session("fork-me", new_session_id="branch")
        with pytest.raises(NotFound):
            bob.session_info("branch")
        blob = alice.export_session("fork-me")
        imported = bob.import_session(blob, session_id="fork-me")  # bob's own session of that id, from alice's state
        np.testing.assert_array_equal(imported.step([26.0]), mine.step([26.0]))
        assert alice.session_info("fork-me").seq == 2
        assert bob.session_info("fork-me").seq == 1
        for session in (mine, branch, imported):
            session.close()
