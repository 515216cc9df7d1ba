"""deploy/nginx/lstm-serve.conf, unchanged, in front of two real lstm-serve processes (memory store).

Round robin spreads calls over both replicas and answers exactly what a replica answers directly; a step stream goes
through; with the session hash, every call of a session reaches one replica (which is what lets a memory-store
session work at all behind nginx); a replica that is down is skipped; the shipped example includes are valid.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_client import Client
from tests.golden import CASES, TOLERANCE, golden
from tests.procs import NGINX_CONF, LstmServeProcess, Nginx, NginxFactory, free_port, health_status, require

Replicas = tuple[LstmServeProcess, LstmServeProcess]


@pytest.fixture(scope="module", autouse=True)
def _nginx_installed() -> None:
    require("nginx")  # before the replicas start


def _calls(nginx: Nginx, method: str) -> list[str]:
    """The replica (upstream address) that served each finished call of `method`, in order."""
    return [e.upstream for e in nginx.access_log() if e.method == method]


def test_calls_through_nginx_equal_direct_calls_and_spread_over_both_replicas(
    replicas: Replicas, make_nginx: NginxFactory
) -> None:
    nginx = make_nginx([r.port for r in replicas])
    assert health_status(nginx.target) == "SERVING"
    with Client(nginx.target) as proxied, Client(replicas[0].target) as direct:
        assert proxied.list_models() == direct.list_models()
        for case in CASES:
            g = golden(case)
            for b in range(2):
                through = proxied.predict(case, g.inputs[b], h0=g.h0[:, b], c0=g.c0[:, b])
                there = direct.predict(case, g.inputs[b], h0=g.h0[:, b], c0=g.c0[:, b])
                np.testing.assert_array_equal(through.outputs, there.outputs)
                np.testing.assert_array_equal(through.h, there.h)
                np.testing.assert_allclose(through.outputs, g.outputs[b], atol=TOLERANCE)
    served = Counter(_calls(nginx, "Predict"))
    assert served == {r.target: len(CASES) for r in replicas}, served  # round robin: 3 each
    assert {e.status for e in nginx.access_log()} == {200}


class _SessionHeader(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    """Adds `x-session-id: SESSION` to every call that does not carry it yet, as clients do on session calls (so this
    test does not depend on which client version sends it)."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id

    def _details(self, details: Any) -> Any:
        metadata = list(details.metadata or ())
        if not any(key == "x-session-id" for key, _ in metadata):
            metadata.append(("x-session-id", self.session_id))
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def test_a_session_streams_through_nginx_on_one_replica_with_the_session_hash(
    replicas: Replicas, make_nginx: NginxFactory
) -> None:
    nginx = make_nginx([r.port for r in replicas], hash_on_session=True)
    xs = golden("golden_l3_head").inputs[0]  # 11 steps
    with Client(replicas[0].target) as direct:
        expected = direct.predict("golden_l3_head", xs).outputs  # the same steps from the zero state, in one call
    ids = [f"nginx-affinity-{i}" for i in range(4)]
    for session_id in ids:
        with Client(nginx.target, interceptors=[_SessionHeader(session_id)]) as client:
            with client.create_session("golden_l3_head", session_id=session_id) as session:
                streamed = np.stack(list(session.stream(xs[:6])))  # one StreamSteps call, 6 requests
                stepped = session.step(xs[6:])  # the other 5 steps in one unary Step
                info = session.info()
                assert (info.seq, info.steps) == (7, 11)
            np.testing.assert_allclose(np.concatenate([streamed, stepped]), expected, atol=TOLERANCE)
    by_session: dict[str, set[str]] = {}
    for entry in nginx.access_log():
        by_session.setdefault(entry.session_id, set()).add(entry.upstream)
    assert set(by_session) == set(ids)
    assert all(len(upstreams) == 1 for upstreams in by_session.values()), by_session
    methods = {e.method for e in nginx.access_log()}
    assert {"CreateSession", "StreamSteps", "Step", "GetSession", "CloseSession"} <= methods
    assert {e.grpc_status for e in nginx.access_log()} == {"0"}


def test_calls_without_a_session_header_spread_even_with_the_session_hash(
    replicas: Replicas, make_nginx: NginxFactory
) -> None:
    nginx = make_nginx([r.port for r in replicas], hash_on_session=True)
    with Client(nginx.target) as client:
        for _ in range(24):
            client.predict("golden_l1_nohead", np.zeros((2, 3)))
    served = Counter(_calls(nginx, "Predict"))
    # Keyed on a random $request_id: both replicas get some (all 24 on one: odds 2 in 2^24).
    assert set(served) == {r.target for r in replicas}, served


def test_a_replica_that_is_down_is_skipped(replicas: Replicas, make_nginx: NginxFactory) -> None:
    dead = free_port()  # nothing listens there: connection refused, nginx goes on to the next replica
    nginx = make_nginx([dead, replicas[0].port])
    with Client(nginx.target) as client:
        for _ in range(4):
            assert client.predict("golden_l1_nohead", np.zeros((1, 3))).outputs.shape == (1, 5)
    upstreams = _calls(nginx, "Predict")
    assert len(upstreams) == 4
    assert all(u.endswith(replicas[0].target) for u in upstreams), upstreams
    assert f"127.0.0.1:{dead}, {replicas[0].target}" in upstreams  # tried the dead one first, then moved on
    assert "Connection refused" in nginx.log_text()


def test_the_shipped_example_includes_are_valid(tmp_path: Path) -> None:
    nginx = Nginx(tmp_path, [1])  # its generated wrapper, then the repository's example includes over its own
    for example in (NGINX_CONF.parent / "lstm-serve.d").glob("*.conf"):
        shutil.copy(example, tmp_path / "lstm-serve.d" / example.name)
    result = nginx.test_config()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_a_stream_may_carry_more_than_a_mebibyte(replicas: Replicas, make_nginx: NginxFactory) -> None:
    """nginx counts a whole stream's messages against client_max_body_size (1 MiB unless the config lifts it)."""
    nginx = make_nginx([replicas[0].port])
    xs = np.random.default_rng(0).standard_normal((12, 4096, 6)).astype(np.float32)  # 12 x 96 KiB
    with Client(nginx.target) as client, client.create_session("golden_l2_wide") as session:
        outputs = list(session.stream(xs))
    assert len(outputs) == 12
    assert outputs[-1].shape == (4096, 3)
