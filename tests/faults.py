"""Network faults for tests: a TCP proxy on 127.0.0.1 that resets, slows down and swallows connections on demand.

    with FaultProxy("127.0.0.1", server_port, seed=7) as proxy:
        client = Client(proxy.target)
        proxy.cut_after(2_000, times=3)   # reset every live connection after 2 kB more reply bytes, three times over
        ...
        proxy.reset_all()                 # reset every live connection now
        proxy.outage(1.0)                 # ... and reset every new one for a second (a restarting replica)
        proxy.delay(0.02)                 # 20 ms more latency on every chunk forwarded, until delay(0)
        proxy.drop(0.5)                   # half the new connections accepted and then never answered, until drop(0)
        proxy.clear()                     # no delay, no drop, no outage, no armed cut
        assert proxy.resets > 0

Resets are real TCP RSTs (SO_LINGER 0), so the client sees what it sees when a replica is killed: the connection
dropped mid-call, with requests the server may or may not have applied and replies that may be cut off. A dropped
connection is what a black-holed replica or a half-dead load balancer gives: the client's bytes are read and thrown
away and nothing ever comes back, until the client gives up on it, `reset_all` resets it or the proxy stops. The proxy
runs its own event loop in a daemon thread, so sync and asyncio clients can both use it; every method is thread-safe
and bounded in time. `seed` makes the choice of the dropped connections reproducible.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, Self, TypeVar

T = TypeVar("T")
Direction = Literal["down", "up", "both"]  # down: server -> client (replies), up: client -> server (requests)

_LINGER_0 = struct.pack("ii", 1, 0)
_WAIT = 10.0  # seconds any call into the proxy thread may take


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None  # None: a dropped connection, never forwarded


@dataclass
class _Cut:
    nbytes: int
    direction: Direction
    times: int
    seen: int = 0


class FaultProxy:
    """Forwards 127.0.0.1:`port` to `upstream_host`:`upstream_port`, and breaks connections when told to."""

    def __init__(
        self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1", seed: int | None = None
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.connections = 0  # accepted so far
        self.resets = 0  # connections reset so far, by any fault
        self.dropped = 0  # connections accepted and swallowed by `drop` so far
        self.delayed = 0  # chunks held back by `delay` so far
        self._live: set[_Connection] = set()
        self._cut: _Cut | None = None
        self._down_until = 0.0
        self._delay = 0.0
        self._delay_direction: Direction = "both"
        self._drop = 0.0
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        self._server = self._do(asyncio.start_server(self._handle, self.host, 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self._do(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_WAIT)
        if not self._thread.is_alive():
            self._loop.close()

    # The faults.

    def reset_all(self) -> int:
        """Resets every live connection now; returns how many."""
        return self._do(self._async(self._reset_all))

    def cut_after(self, nbytes: int, *, direction: Direction = "down", times: int = 1) -> None:
        """Once `nbytes` more bytes have gone through in `direction` (over all connections), forwards up to that byte
        and resets every live connection (bytes still in flight may be lost, as in a crash); then counts again from
        zero, `times` times in all. Arming it again replaces what is left of the previous one."""
        if nbytes < 1 or times < 1:
            raise ValueError("nbytes and times must be >= 1")

        def arm() -> None:
            self._cut = _Cut(nbytes, direction, times)

        self._do(self._async(arm))

    def outage(self, seconds: float) -> int:
        """Resets every live connection, and every new one during the next `seconds`: a replica restarting. Returns
        how many live connections were reset."""

        def start() -> int:
            self._down_until = time.monotonic() + seconds
            return self._reset_all()

        return self._do(self._async(start))

    def delay(self, seconds: float, *, direction: Direction = "both") -> None:
        """Holds every chunk of bytes forwarded in `direction` for `seconds` before passing it on (order kept), from
        now until `delay(0)`: a slow or congested network. Bytes already waiting are not affected."""
        if not 0 <= seconds <= _WAIT:
            raise ValueError(f"delay must be between 0 and {_WAIT} s")

        def arm() -> None:
            self._delay, self._delay_direction = seconds, direction

        self._do(self._async(arm))

    def drop(self, probability: float) -> None:
        """From now until `drop(0)`, each new connection is, with this probability, accepted and then never answered:
        its bytes are read and thrown away until the client closes it, `reset_all` resets it or the proxy stops.
        Connections already open are not affected."""
        if not 0 <= probability <= 1:
            raise ValueError("probability must be between 0 and 1")

        def arm() -> None:
            self._drop = probability

        self._do(self._async(arm))

    def clear(self) -> None:
        """Ends every fault still in force: delay, drop, an outage, an armed cut. Open connections stay as they are
        (dropped ones stay stalled: `reset_all` frees them)."""

        def disarm() -> None:
            self._delay, self._drop, self._down_until, self._cut = 0.0, 0.0, 0.0, None

        self._do(self._async(disarm))

    def cuts_pending(self) -> int:
        """How many of the armed `cut_after` resets have yet to happen."""
        return self._do(self._async(lambda: self._cut.times if self._cut is not None else 0))

    # The machinery, all on the proxy's loop.

    def _do(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_WAIT)

    @staticmethod
    async def _async(fn: Callable[[], T]) -> T:
        return fn()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_all(count=False)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:  # reset connections end their tasks by themselves; a cancelled one would be logged as an error
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _reset_all(self, *, count: bool = True) -> int:
        live = list(self._live)
        self._live.clear()
        for conn in live:
            _reset(conn.client)
            if conn.upstream is not None:
                _reset(conn.upstream)
        if count:
            self.resets += len(live)
        return len(live)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if time.monotonic() < self._down_until:
            self.resets += 1
            _reset(writer)
            return
        if self._drop and self._rng.random() < self._drop:
            await self._swallow(reader, writer)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.upstream), _WAIT)
        except (OSError, TimeoutError):
            _reset(writer)
            return
        conn = _Connection(writer, up_writer)
        self._live.add(conn)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, "up")),
            asyncio.create_task(self._pump(up_reader, writer, "down")),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)  # either side closing ends both
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            if conn in self._live:  # not reset: close both sides
                self._live.discard(conn)
                for w in (writer, up_writer):
                    with contextlib.suppress(Exception):
                        w.close()

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A dropped connection: reads and discards until the client closes it or it is reset."""
        self.dropped += 1
        conn = _Connection(writer, None)
        self._live.add(conn)
        try:
            with contextlib.suppress(OSError):
                while await reader.read(65536):
                    pass
        finally:
            if conn in self._live:  # the client closed it: close our side too
                self._live.discard(conn)
                with contextlib.suppress(Exception):
                    writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if self._delay and self._delay_direction in (direction, "both"):
                    self.delayed += 1
                    await asyncio.sleep(self._delay)
                cut = self._cut
                if cut is None or cut.direction not in (direction, "both"):
                    pass
                elif cut.seen + len(data) >= cut.nbytes:
                    self._cut = _Cut(cut.nbytes, cut.direction, cut.times - 1) if cut.times > 1 else None
                    writer.write(data[: cut.nbytes - cut.seen])
                    await _drained(writer.drain())
                    self._reset_all()
                    return
                else:
                    cut.seen += len(data)
                writer.write(data)
                await writer.drain()


async def _drained(drain: Awaitable[None]) -> None:
    with contextlib.suppress(OSError):
        await asyncio.wait_for(drain, 1.0)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes with a TCP RST rather than a FIN: what a killed process's peer sees."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
    writer.transport.abort()
