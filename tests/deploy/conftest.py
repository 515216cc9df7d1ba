"""Fixtures of the container tests: one Docker engine, the base image and the project image, for the whole session.

What the tests measured (build time, image size, cold start) is printed at the end of the run, so that CI logs show
the figures docs/operations.md reports.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.deploy.engine import REPO, Engine, engine, python_base_image

PROJECT_IMAGE = "lstm-serve:test"  # a tag of its own: an operator's lstm-serve:latest is left alone
BUILD_STAGE_IMAGE = "lstm-serve:test-build-stage"  # tagged so that the next run's build finds it in the cache
FIGURES: list[str] = []


def report(line: str) -> None:
    FIGURES.append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("container figures (tests/deploy)")
        for line in FIGURES:
            terminalreporter.write_line(line)


@dataclass(frozen=True)
class Image:
    ref: str
    base: str
    size: int  # bytes, as `docker image inspect` counts them
    base_size: int


@pytest.fixture(scope="session")
def docker() -> Iterator[Engine]:
    with engine() as running:
        yield running


@pytest.fixture(scope="session")
def base_image(docker: Engine) -> str:
    log: list[str] = []
    started = time.monotonic()
    ref = python_base_image(docker, log)
    report(f"{log[-1]} [{time.monotonic() - started:.0f} s]")
    return ref


def _size(docker: Engine, ref: str) -> int:
    return int(json.loads(docker.run("image", "inspect", "--format", "{{json .Size}}", ref).stdout))


@pytest.fixture(scope="session")
def image(docker: Engine, base_image: str) -> Image:
    """The project image, built from the repository's Dockerfile as an operator builds it (`--network host`: this
    engine has no bridge network; the build downloads the Python dependencies)."""
    started = time.monotonic()
    build = ["build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base_image}"]
    try:
        docker.run(*build, "--target", "build", "-t", BUILD_STAGE_IMAGE, str(REPO), timeout=1200)
        docker.run(*build, "-t", PROJECT_IMAGE, str(REPO), timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("docker build took more than 20 minutes")
    if docker.owned:  # the images that earlier runs' tags have moved away from (never an operator's engine)
        docker.run("image", "prune", "--force", timeout=300)
    built = Image(PROJECT_IMAGE, base_image, _size(docker, PROJECT_IMAGE), _size(docker, base_image))
    report(
        f"docker build: {time.monotonic() - started:.0f} s; image {built.size / 1e6:.1f} MB "
        f"(base {built.base_size / 1e6:.1f} MB + {(built.size - built.base_size) / 1e6:.1f} MB)"
    )
    return built
