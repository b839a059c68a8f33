"""A TCP proxy that adds network delay, for the benchmark of views under delay (issue 6 §2c).

    python -m bench.delay_proxy          # prints "ready", then takes commands on stdin:
    add NAME                             # -> "NAME listening on 127.0.0.1:PORT"
    target NAME HOST:PORT                # where NAME forwards to -> "ok"
    delay NAME|* MS                      # added delay, in milliseconds -> "ok"

Each route listens on its own port and forwards every connection to its target. The delay
is added once per round trip: bytes from the client (the directory) reach the server (the
node) DELAY later, as if the link were that much longer one way; bytes back are forwarded
at once. Bytes are queued with their due time, never blocking the reading side, so the
link keeps its throughput (a pipe, not a stop-and-wait). TLS passes through untouched:
the proxy sees only ciphertext. A connection to a route without a target is closed.

Delays are set at run time so that one run can compare the same path with and without
delay. Never a sleep in the node's code: the delay is on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field

_CHUNK = 256 * 1024


@dataclass
class Route:
    name: str
    delay: float = 0.0  # seconds, client -> server
    target: tuple[str, int] | None = None
    server: asyncio.Server | None = None
    connections: set[asyncio.Task[None]] = field(default_factory=set)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pump(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, route: Route, delayed: bool
) -> None:
    """Copy source to sink; with `delayed`, each chunk leaves route.delay after it came."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError, RuntimeError):
                    if sink.can_write_eof():
                        sink.write_eof()
                return
            sink.write(data)
            await sink.drain()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await source.read(_CHUNK)
            due = loop.time() + (route.delay if delayed else 0.0)
            if not delayed and queue.empty() and data:
                sink.write(data)  # nothing queued: forward at once, keeping the order
                await sink.drain()
                continue
            queue.put_nowait((due, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()


async def _handle(route: Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if route.target is None:
        writer.close()
        return
    try:
        up_reader, up_writer = await asyncio.open_connection(*route.target)
    except OSError:
        writer.close()
        return
    _nodelay(writer)
    _nodelay(up_writer)
    try:
        await asyncio.gather(
            _pump(reader, up_writer, route, True),
            _pump(up_reader, writer, route, False),
        )
    finally:
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.close()


class Proxy:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.routes: dict[str, Route] = {}

    async def add(self, name: str) -> str:
        route = self.routes.get(name) or Route(name)
        self.routes[name] = route
        if route.server is None:

            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                task = asyncio.current_task()
                assert task is not None
                route.connections.add(task)
                try:
                    await _handle(route, reader, writer)
                finally:
                    route.connections.discard(task)

            route.server = await asyncio.start_server(handle, self.host, 0)
        port = route.server.sockets[0].getsockname()[1]
        return f"{name} listening on {self.host}:{port}"

    async def execute(self, line: str) -> str:
        words = line.split()
        if not words:
            return "error: empty command"
        if words[0] == "add" and len(words) == 2:
            return await self.add(words[1])
        if words[0] == "target" and len(words) == 3 and words[1] in self.routes:
            host, _, port = words[2].rpartition(":")
            self.routes[words[1]].target = (host, int(port))
            return "ok"
        if words[0] == "delay" and len(words) == 3:
            seconds = float(words[2]) / 1000.0
            names = list(self.routes) if words[1] == "*" else [words[1]]
            if any(name not in self.routes for name in names):
                return f"error: unknown route {words[1]}"
            for name in names:
                self.routes[name].delay = seconds
            return "ok"
        return f"error: cannot do {line!r}"


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    proxy = Proxy()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.strip())
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read_stdin, name="commands", daemon=True).start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)

    async def commands() -> None:
        while True:
            line = await lines.get()
            if line is None:
                stop.set()
                return
            try:
                answer = await proxy.execute(line)
            except (ValueError, OSError) as exc:
                answer = f"error: {exc}"
            print(answer, flush=True)

    reader = asyncio.create_task(commands())
    await stop.wait()
    reader.cancel()
    for route in proxy.routes.values():
        if route.server is not None:
            route.server.close()
        for task in list(route.connections):
            task.cancel()


def main() -> None:
    asyncio.run(_serve())


if __name__ == "__main__":
    main()
