"""A real server on 127.0.0.1 (port 0), run by the real App in a background thread, for tests to drive with the real
client."""

from __future__ import annotations

import asyncio
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from lstm_client import Client
from lstm_serve.app import App
from lstm_serve.config import Settings
from tests.golden import CASES, FIXTURES, REPO, write_model_dir


@dataclass
class RunningServer:
    app: App
    loop: asyncio.AbstractEventLoop

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.app.metrics_port}/metrics"

    def client(self, **kwargs: object) -> Client:
        return Client(self.target, **kwargs)  # type: ignore[arg-type]


def model_repository(root: Path) -> Path:
    """The demo model, every golden model, and one broken model that must not stop the others."""
    for demo in ("elnino", "macro"):
        shutil.copytree(REPO / "models" / demo, root / demo)
    for case in CASES:
        write_model_dir(root, case, FIXTURES / f"{case}.npz")
    write_model_dir(root, "broken", root / "missing.npz")
    return root


@dataclass
class _Thread:
    thread: threading.Thread
    stop: asyncio.Event


def start_server(settings: Settings) -> tuple[RunningServer, _Thread]:
    started = threading.Event()
    holder: dict[str, object] = {}

    def run() -> None:
        async def main() -> None:
            app = App(settings)
            stop = asyncio.Event()
            try:
                await app.start()
            except BaseException as exc:  # reported to the caller by start_server, not raised in this thread
                await app.stop(grace=0)
                holder["error"] = exc
                started.set()
                return
            holder["server"] = RunningServer(app, asyncio.get_running_loop())
            holder["stop"] = stop
            started.set()
            await stop.wait()
            await app.stop(grace=1.0)

        asyncio.run(main())

    thread = threading.Thread(target=run, name="lstm-serve-test", daemon=True)
    thread.start()
    if not started.wait(30):
        raise TimeoutError("server did not start in 30 s")
    if "error" in holder:
        error = holder["error"]
        assert isinstance(error, BaseException)
        raise RuntimeError("server failed to start") from error
    server = holder["server"]
    assert isinstance(server, RunningServer)
    stop = holder["stop"]
    assert isinstance(stop, asyncio.Event)
    return server, _Thread(thread, stop)


def stop_server(server: RunningServer, handle: _Thread) -> None:
    server.loop.call_soon_threadsafe(handle.stop.set)
    handle.thread.join(30)
    assert not handle.thread.is_alive(), "server thread did not stop"


def test_settings(model_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
        "model_dir": model_dir,
        "max_message_bytes": 256 * 1024,
        "max_steps_per_request": 512,
        "sweep_interval": 0.1,
    }
    return Settings(**(values | overrides))  # type: ignore[arg-type]


test_settings.__test__ = False  # type: ignore[attr-defined]
