"""A Docker engine for the image and compose tests, and the base image they build on.

`engine()` uses the engine that DOCKER_HOST (or /var/run/docker.sock) names when one answers; otherwise, as root, it
starts Debian's dockerd (`docker.io`) itself, as this machine kind allows: no iptables, no bridge (containers use the
host's network and listen on free loopback ports), with its own socket, pidfile and exec-root in a temporary directory
and its own data-root, so that it never touches another engine. Only that dockerd is stopped afterwards, by its PID.
The data-root lives in .cache/docker (gitignored) when no other run holds it, so a rerun finds its build cache.

`python_base_image()` is the PYTHON_IMAGE the Dockerfile builds on: the official python image when the engine has it
or can pull it; otherwise (no registry reachable) an image made from Debian 12 packages with debootstrap (python3,
python3-venv), whose root file system is cached as a tarball in .cache/docker, so only the first run downloads it.

Without a docker CLI, dockerd or root the tests are skipped with the reason; in CI (CI=true) they fail instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import ManagedProcess

REPO = Path(__file__).resolve().parent.parent.parent
CACHE = REPO / ".cache" / "docker"
OFFICIAL_PYTHON_IMAGE = "python:3.11-slim-bookworm"  # the Dockerfile's default PYTHON_IMAGE
DEBIAN_BASE_TAG = "lstm-serve-test/debian-python3:bookworm"  # never pushed anywhere: made and used here
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_PACKAGES = ("python3", "python3-venv")
TEST_LABEL = "lstm-serve-test=1"  # on every container the tests start, to clear leftovers of a killed run


def unavailable(reason: str) -> None:
    """Skips the test with the reason; fails it in CI, where .ci/run installs the engine and runs as root."""
    if os.environ.get("CI"):
        pytest.fail(f"no Docker engine in CI: {reason}")
    pytest.skip(f"no Docker engine: {reason}")


@dataclass(frozen=True)
class Engine:
    """The docker CLI bound to one engine."""

    docker: str
    host: str  # DOCKER_HOST
    owned: bool = False  # started by the tests: its images are ours to prune

    def env(self) -> dict[str, str]:
        return os.environ | {"DOCKER_HOST": self.host}

    def run(
        self, *args: str, timeout: float = 120, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.docker, *args], capture_output=True, text=True, timeout=timeout, env=self.env(), input=input
        )
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
        return result

    def answers(self) -> bool:
        try:
            return self.run("version", "--format", "{{.Server.Version}}", timeout=10, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def has_image(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, timeout=30, check=False).returncode == 0

    def remove_test_containers(self) -> None:
        listed = self.run("ps", "-aq", "--filter", f"label={TEST_LABEL}", timeout=30).stdout.split()
        if listed:
            self.run("rm", "-f", *listed, timeout=60)


class Dockerd(ManagedProcess):
    """dockerd started by the tests: host networking only, everything of its own under `state` and `data_root`."""

    name = "dockerd"

    def __init__(self, state: Path, data_root: Path, docker: str) -> None:
        super().__init__(state)
        self.state = state
        self.data_root = data_root
        self.socket = state / "docker.sock"
        self.client = Engine(docker, f"unix://{self.socket}", owned=True)

    def argv(self) -> list[str]:
        return [
            shutil.which("dockerd") or "/usr/sbin/dockerd",
            f"--data-root={self.data_root}",
            f"--exec-root={self.state / 'exec'}",
            f"--pidfile={self.state / 'dockerd.pid'}",
            f"--host={self.client.host}",
            "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
            "--bridge=none",  # no docker0: the host's network namespace stays as it is
        ]  # fmt: skip

    def probe(self) -> bool:
        return self.socket.exists() and self.client.answers()


@contextlib.contextmanager
def engine() -> Iterator[Engine]:
    """An engine for the tests: the one that runs, or a dockerd of our own (stopped on exit)."""
    docker = shutil.which("docker")
    if docker is None:
        unavailable("no docker CLI (apt-get install docker.io)")
        raise AssertionError  # unreachable: unavailable() skips or fails
    existing = Engine(docker, os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")
    if existing.answers():
        existing.remove_test_containers()
        yield existing
        return
    if os.geteuid() != 0:
        unavailable("no engine answers and starting dockerd needs root")
    if shutil.which("dockerd") is None and not os.access("/usr/sbin/dockerd", os.X_OK):
        unavailable("no engine answers and there is no dockerd (apt-get install docker.io)")
    with contextlib.ExitStack() as stack:
        # exec-root holds containerd's sockets: a short path under /tmp (unix socket paths are limited to 108 bytes)
        state = Path(tempfile.mkdtemp(prefix="lstm-dockerd-", dir="/tmp"))
        stack.callback(_remove_state, state)
        CACHE.mkdir(parents=True, exist_ok=True)
        lock = stack.enter_context(open(CACHE / "data-root.lock", "w"))
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            data_root = CACHE / "data-root"
        except BlockingIOError:  # another run uses the cached data-root: a throwaway one
            data_root = state / "data-root"
        daemon = Dockerd(state, data_root, docker)
        daemon.start()
        stack.callback(daemon.stop, timeout=60)
        try:
            daemon.wait_ready(timeout=90)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"dockerd did not start: {exc}")
        daemon.client.remove_test_containers()
        yield daemon.client
        daemon.client.remove_test_containers()


def _remove_state(state: Path) -> None:
    """Removes our dockerd's state directory, after unmounting what dockerd leaves mounted there (exec-root/netns)."""
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in sorted((p for p in points if p.startswith(f"{state}/")), reverse=True):
        subprocess.run(["umount", point], capture_output=True, timeout=30)
    shutil.rmtree(state, ignore_errors=True)


def python_base_image(docker: Engine, log: list[str]) -> str:
    """The PYTHON_IMAGE to build on (see the module's docstring); `log` gets a line saying which and why."""
    if docker.has_image(OFFICIAL_PYTHON_IMAGE):
        log.append(f"base image: {OFFICIAL_PYTHON_IMAGE} (present in the engine)")
        return OFFICIAL_PYTHON_IMAGE
    pulled = docker.run("pull", OFFICIAL_PYTHON_IMAGE, timeout=300, check=False)
    if pulled.returncode == 0:
        log.append(f"base image: {OFFICIAL_PYTHON_IMAGE} (pulled)")
        return OFFICIAL_PYTHON_IMAGE
    reason = (pulled.stderr.strip().splitlines() or ["?"])[-1]
    if docker.has_image(DEBIAN_BASE_TAG):
        log.append(f"base image: {DEBIAN_BASE_TAG} (present; {OFFICIAL_PYTHON_IMAGE} cannot be pulled: {reason})")
        return DEBIAN_BASE_TAG
    debian_base_image(docker)
    log.append(f"base image: {DEBIAN_BASE_TAG} (made from Debian packages; {OFFICIAL_PYTHON_IMAGE}: {reason})")
    return DEBIAN_BASE_TAG


def debian_base_image(docker: Engine) -> str:
    """DEBIAN_BASE_TAG in `docker`, imported from the cached root file system (made first if need be)."""
    if not docker.has_image(DEBIAN_BASE_TAG):
        docker.run(
            "import",
            "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change", "ENV LANG=C.UTF-8",
            "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",  # the system's roots, local CAs included
            "--change", 'CMD ["python3"]',
            str(debian_rootfs_tarball()), DEBIAN_BASE_TAG,
            timeout=300,
        )  # fmt: skip
    return DEBIAN_BASE_TAG


def debian_rootfs_tarball(packages: Sequence[str] = DEBIAN_PACKAGES) -> Path:
    """A Debian root file system with `packages` and this host's local CAs as a tarball for `docker import`, made once
    with debootstrap and kept in .cache/docker (the name says what it holds; delete it to make a fresh one)."""
    tarball = CACHE / f"debian-{DEBIAN_SUITE}-minbase-{'-'.join(packages)}.tar"
    if tarball.exists():
        return tarball
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.access(debootstrap, os.X_OK):
        unavailable("no debootstrap to make a base image from Debian packages (apt-get install debootstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=CACHE) as work:
        rootfs = Path(work) / "rootfs"
        started = time.monotonic()
        made = subprocess.run(
            [debootstrap, "--variant=minbase", f"--include={','.join(packages)}", DEBIAN_SUITE, str(rootfs),
             DEBIAN_MIRROR],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert made.returncode == 0, f"debootstrap failed:\n{made.stdout[-3000:]}\n{made.stderr[-3000:]}"
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info"):
            for entry in (rootfs / junk).glob("*"):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                elif entry.name != "lock":
                    entry.unlink()
        # The trust anchors this host's administrators added (a TLS-inspecting proxy's CA, say): pip in the build must
        # reach PyPI through the same network as the host does.
        local_cas = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        if local_cas:
            for ca in local_cas:
                shutil.copyfile(ca, rootfs / "usr/local/share/ca-certificates" / ca.name)
            subprocess.run(
                ["chroot", str(rootfs), "update-ca-certificates"], check=True, capture_output=True, timeout=120
            )
        partial = Path(work) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], check=True, timeout=300)
        partial.rename(tarball)
        print(f"debootstrap made {tarball.name} in {time.monotonic() - started:.0f} s")
    return tarball
