"""Fixtures of the multi-process tests: real lstm-serve processes, nginx and redis-server (tests/procs.py).

When a test fails, the logs of every program that was running during it are printed (pytest shows them under the
test's "Captured stdout teardown").
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path

import pytest

from tests.procs import LstmServeProcess, ManagedProcess, Nginx, NginxFactory, require, running
from tests.servers import model_repository

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, object]:
    report = yield
    if isinstance(report, pytest.TestReport) and report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture(autouse=True)
def _print_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.time()
    yield
    if request.node.stash.get(_FAILED, False):
        for proc in ManagedProcess.instances:
            if proc.running or proc.log_mtime() >= started:
                proc.print_log()


@pytest.fixture(scope="session")
def cluster_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_repository(tmp_path_factory.mktemp("cluster-models"))


@pytest.fixture(scope="module")
def replicas(
    cluster_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LstmServeProcess, LstmServeProcess]]:
    """Two lstm-serve processes with the default (memory) store, shared by a test module."""
    logs = tmp_path_factory.mktemp("replicas")
    a = LstmServeProcess(cluster_models, log_dir=logs, name="replica-a")
    b = LstmServeProcess(cluster_models, log_dir=logs, name="replica-b")
    with running(a, b):
        yield a, b


@pytest.fixture
def make_nginx(tmp_path: Path) -> Iterator[NginxFactory]:
    """`make_nginx(upstream_ports, hash_on_session=False)`: a running nginx with deploy/nginx/lstm-serve.conf."""
    require("nginx")
    started: list[Nginx] = []

    def make(upstream_ports: Sequence[int], hash_on_session: bool = False) -> Nginx:
        nginx = Nginx(tmp_path / f"nginx-{len(started)}", upstream_ports, hash_on_session)
        started.append(nginx)
        return nginx.start().wait_ready()

    yield make
    for nginx in reversed(started):
        nginx.stop()
