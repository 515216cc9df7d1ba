"""Fixtures shared by every test directory: one real server for the session, and a client for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lstm_client import Client
from tests.servers import RunningServer, model_repository, start_server, stop_server, test_settings


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running, handle = start_server(test_settings(model_repository(tmp_path_factory.mktemp("models"))))
    yield running
    stop_server(running, handle)


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with server.client() as c:
        yield c
