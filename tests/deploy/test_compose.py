"""`docker-compose up` of docker-compose.yml for real: Redis, two lstm-serve replicas sharing it, nginx in front,
Prometheus scraping both, Grafana with the provisioned dashboard.

This engine has no bridge network, so tests/deploy/compose.host-network.yml puts every service on the host's network
on free loopback ports (the configs naming services rewritten to those addresses), and where the official images
cannot be pulled, compose.standins.yml builds local ones from Debian packages (Grafana's is a stand-in, not Grafana:
see standins/README.md). Both are override files: docker-compose.yml itself is used as it is.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from lstm_client import Client
from tests.deploy.conftest import Image, report
from tests.deploy.engine import REPO, Engine, debian_base_image
from tests.deploy.test_image import reference_outputs
from tests.procs import free_port, health_status, require

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.timeout(1800)  # the first test also builds the images (minutes on a cold machine)
REAL_IMAGES = {"redis": "redis:7.2-bookworm", "nginx": "nginx:1.26-bookworm", "prometheus": "prom/prometheus:v2.53.0"}
GRAFANA_IMAGE = "grafana/grafana:11.1.0"
SESSIONS = 24  # nginx hashes session ids over 2 replicas: all on one has a chance of 2 * 2**-24
STEPS = 6


def _rewrite(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} is no longer in the deployment's config: update the compose test"
    return text.replace(old, new)


@dataclass
class Topology:
    docker: Engine
    files: list[str]
    project: str
    env: dict[str, str]
    ports: dict[str, int]
    standins: list[str] = field(default_factory=list)

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [require("docker-compose"), "--project-name", self.project, "--project-directory", str(REPO)]
        for file in self.files:
            command += ["-f", file]
        result = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=timeout, env=self.docker.env() | self.env
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
            )
        return result

    def container(self, service: str) -> dict[str, Any]:
        ids = self.compose("ps", "-q", service).stdout.split()
        assert len(ids) == 1, (service, ids)
        state: dict[str, Any] = json.loads(self.docker.run("inspect", ids[0]).stdout)[0]
        return state

    @property
    def nginx(self) -> str:
        return f"127.0.0.1:{self.ports['nginx']}"

    @property
    def prometheus(self) -> str:
        return f"http://127.0.0.1:{self.ports['prometheus']}"

    @property
    def grafana(self) -> str:
        return f"http://127.0.0.1:{self.ports['grafana']}"


def _write_configs(directory: Path, ports: dict[str, int]) -> None:
    """The real configs that name services, with only those names rewritten to the loopback ports."""
    nginx = directory / "nginx"
    nginx.mkdir()
    upstream = (REPO / "deploy/nginx/compose.d/upstream.conf").read_text()
    upstream = _rewrite(upstream, "lstm-serve-1:50051", f"127.0.0.1:{ports['lstm-serve-1']}")
    (nginx / "upstream.conf").write_text(_rewrite(upstream, "lstm-serve-2:50051", f"127.0.0.1:{ports['lstm-serve-2']}"))
    listen = (REPO / "deploy/nginx/compose.d/listen.conf").read_text()
    (nginx / "listen.conf").write_text(_rewrite(listen, "listen 50051", f"listen 127.0.0.1:{ports['nginx']}"))
    prometheus = (REPO / "deploy/prometheus/prometheus.yml").read_text()
    prometheus = _rewrite(prometheus, "lstm-serve-1:9464", f"127.0.0.1:{ports['lstm-serve-1-metrics']}")
    prometheus = _rewrite(prometheus, "lstm-serve-2:9464", f"127.0.0.1:{ports['lstm-serve-2-metrics']}")
    (directory / "empty.conf").write_text("# the official nginx image's default server (port 80) left out\n")
    (directory / "prometheus.yml").write_text(_rewrite(prometheus, "5s", "1s"))  # scrape and evaluate faster
    datasources = directory / "grafana-datasources"
    datasources.mkdir()
    source = (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    url = f"http://127.0.0.1:{ports['prometheus']}"
    (datasources / "prometheus.yml").write_text(_rewrite(source, "http://prometheus:9090", url))


def _pullable(docker: Engine, ref: str) -> bool:
    return docker.has_image(ref) or docker.run("pull", ref, timeout=300, check=False).returncode == 0


def _wait(what: str, check: Any, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.3)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def topology(docker: Engine, image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    config = tmp_path_factory.mktemp("compose")
    names = ("redis", "lstm-serve-1", "lstm-serve-1-metrics", "lstm-serve-2", "lstm-serve-2-metrics", "nginx")
    ports = {name: free_port() for name in (*names, "prometheus", "grafana")}
    _write_configs(config, ports)
    files = [str(REPO / "docker-compose.yml"), str(HERE / "compose.host-network.yml")]
    env = {
        "LSTM_TEST_CONFIG": str(config),
        "LSTM_TEST_IMAGE": image.ref,
        "REDIS_PORT": str(ports["redis"]),
        "LSTM_1_PORT": str(ports["lstm-serve-1"]),
        "LSTM_1_METRICS_PORT": str(ports["lstm-serve-1-metrics"]),
        "LSTM_2_PORT": str(ports["lstm-serve-2"]),
        "LSTM_2_METRICS_PORT": str(ports["lstm-serve-2-metrics"]),
        "PROMETHEUS_PORT": str(ports["prometheus"]),
        "GRAFANA_PORT": str(ports["grafana"]),
    }
    missing = [ref for ref in (*REAL_IMAGES.values(), GRAFANA_IMAGE) if not _pullable(docker, ref)]
    standins: list[str] = []
    if missing:  # no registry: every service but lstm-serve from Debian packages (Grafana: a stand-in, not Grafana)
        files.append(str(HERE / "compose.standins.yml"))
        env["LSTM_TEST_DEBIAN_IMAGE"] = debian_base_image(docker)
        standins = ["redis", "nginx", "prometheus", "grafana"]
        report(f"compose: cannot pull {', '.join(missing)}: stand-ins from Debian packages for {', '.join(standins)}")
    topology = Topology(docker, files, f"lstmtest{os.getpid()}", env, ports, standins)
    # docker-compose (1.29) refuses published ports on the host network, and an override cannot remove them: the
    # merged configuration, as `docker-compose config` prints it, without them is what runs.
    merged = yaml.safe_load(topology.compose("config").stdout)
    for service in merged["services"].values():
        if service.get("network_mode") == "host":
            service.pop("ports", None)
    (config / "compose.merged.yml").write_text(yaml.safe_dump(merged))
    topology.files = [str(config / "compose.merged.yml")]
    started = time.monotonic()
    if standins:
        topology.compose("build", *standins, timeout=900)
    built = time.monotonic()
    try:
        topology.compose("up", "-d", "--no-build", timeout=300)
        for replica in ("lstm-serve-1", "lstm-serve-2"):
            _wait(
                f"{replica} healthy", lambda r=replica: topology.container(r)["State"]["Health"]["Status"] == "healthy"
            )
        _wait("nginx", lambda: health_status(topology.nginx, service="") == "SERVING")
        _wait("prometheus", lambda: urllib.request.urlopen(f"{topology.prometheus}/-/ready", timeout=2).status == 200)
        _wait("grafana", lambda: _get(f"{topology.grafana}/api/health")["database"] == "ok")
        report(
            f"compose: stand-in images built in {built - started:.0f} s; `up` to every service ready "
            f"{time.monotonic() - built:.0f} s"
        )
        yield topology
    finally:
        logs = topology.compose("logs", "--no-color", "--tail", "40", check=False).stdout
        down = topology.compose("down", "--volumes", "--timeout", "30", check=False)
        print(f"----- compose logs -----\n{logs[-8000:]}\n----- down: {down.returncode} {down.stderr[-2000:]}")


def _steps_by_replica(topology: Topology) -> dict[str, float]:
    query = urllib.parse.urlencode({"query": 'sum by (instance) (lstm_steps_total{job="lstm-serve"})'})
    data = _get(f"{topology.prometheus}/api/v1/query?{query}")
    assert data["status"] == "success", data
    return {s["metric"]["instance"]: float(s["value"][1]) for s in data["data"]["result"]}


def test_sessions_through_nginx_use_both_replicas_and_survive_one_stopping(topology: Topology) -> None:
    inputs = np.linspace(-2.0, 2.0, 2 * STEPS, dtype=np.float32)[:, None]
    expected = reference_outputs("elnino", inputs)
    with Client(topology.nginx, timeout=15) as client:
        sessions = [client.create_session("elnino") for _ in range(SESSIONS)]
        for session in sessions:
            got = [session.step(x) for x in inputs[:STEPS]]
            np.testing.assert_allclose(np.array(got), expected[:STEPS], rtol=1e-5, atol=1e-6)

        # Prometheus scrapes both replicas, and both served steps (nginx hashes sessions over the replicas).
        metrics = {name: f"127.0.0.1:{topology.ports[name + '-metrics']}" for name in ("lstm-serve-1", "lstm-serve-2")}
        by_replica = _wait(
            "steps of both replicas in Prometheus",
            lambda: (steps := _steps_by_replica(topology)) and sum(steps.values()) == SESSIONS * STEPS and steps,
            timeout=60,
        )
        assert set(by_replica) == set(metrics.values()), by_replica
        assert all(count > 0 for count in by_replica.values()), by_replica
        up = _get(f"{topology.prometheus}/api/v1/query?query=up")["data"]["result"]
        assert sorted(s["metric"]["instance"] for s in up if s["value"][1] == "1") == sorted(metrics.values()), up

        # docker-compose stop of one replica (SIGTERM, drain, exit 0): every session goes on through nginx, with
        # the state Redis holds, on the other replica.
        topology.compose("stop", "lstm-serve-1", timeout=60)
        state = topology.container("lstm-serve-1")["State"]
        assert not state["Running"], state
        assert state["ExitCode"] == 0, state
        for session in sessions:
            got = [session.step(x) for x in inputs[STEPS:]]
            np.testing.assert_allclose(np.array(got), expected[STEPS:], rtol=1e-5, atol=1e-6)
        for session in sessions:
            session.close()
    report(
        f"compose: {SESSIONS} sessions x {STEPS} steps through nginx over both replicas "
        f"({', '.join(f'{int(v)}' for v in by_replica.values())} steps each), then {STEPS} more each after stopping one"
    )


def test_grafana_loads_the_provisioned_dashboard_and_its_queries_return_data(topology: Topology) -> None:
    """Through Grafana's HTTP API (the stand-in answers the same paths): the provisioned dashboard is the committed
    one, and every panel's query, sent through the provisioned Prometheus datasource, evaluates."""
    dashboard_file = json.loads((REPO / "deploy/grafana/dashboards/lstm-serve.json").read_text())
    found = _get(f"{topology.grafana}/api/search")
    assert [d["uid"] for d in found] == [dashboard_file["uid"]], found
    loaded = _get(f"{topology.grafana}/api/dashboards/uid/{dashboard_file['uid']}")["dashboard"]
    assert loaded["panels"] == dashboard_file["panels"]
    for panel in loaded["panels"]:
        for target in panel["targets"]:
            source = target["datasource"]["uid"]
            query = urllib.parse.urlencode({"query": target["expr"].replace("$__rate_interval", "30s")})
            data = _get(f"{topology.grafana}/api/datasources/proxy/uid/{source}/api/v1/query?{query}")
            assert data["status"] == "success", (panel["title"], data)
    with Client(topology.nginx, timeout=15) as client, client.create_session("elnino") as session:
        for x in (0.5, 1.0, 1.5):
            session.step([x])
    steps = urllib.parse.urlencode({"query": 'sum(lstm_steps_total{job="lstm-serve"})'})
    _wait(
        "steps in Prometheus, read through Grafana's datasource",
        lambda: _get(f"{topology.grafana}/api/datasources/proxy/uid/prometheus/api/v1/query?{steps}")["data"]["result"],
        timeout=60,
    )
    health = _get(f"{topology.grafana}/api/health")
    report(f"compose: Grafana {health['version']}: dashboard {loaded['title']!r}, {len(loaded['panels'])} panels")
