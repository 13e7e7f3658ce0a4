"""A fault-injecting TCP/HTTPS proxy for tests: a real server behind it, faults in between.

    with FaultyProxy("127.0.0.1", 5000) as proxy: ...          # plain TCP, proxy.url
    proxy.down(); proxy.up()                                  # refuse connections, then serve again

With `faults` (or `on_request`) it speaks HTTP/1.1 (over TLS when given `server_tls`/`upstream_tls`), one request
per connection (it asks both ends for `Connection: close`), and answers a seeded share of the
requests itself: 429 with `Retry-After`, 500 before the request reaches the server, or 500
after it did (the reply lost: the client must not apply a write twice), and it cuts watch
streams after a few seconds. `max_in_a_row` bounds the faults so that a client which retries
always gets through; `counts` says what was injected. Runs in a thread of its own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from tests.support.mlflow_server import free_port

HEAD_LIMIT = 256 * 1024
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Faults:
    """Shares of the requests that fail (each in 0..1), and how watch streams are cut."""

    seed: int = 0
    throttle: float = 0.0      # answered 429 Too Many Requests, never sent on
    error: float = 0.0         # answered 500, never sent on
    lost_reply: float = 0.0    # writes only: sent on, the server's reply replaced by a 500
    watch_cut: tuple[float, float] | None = None  # a watch stream is cut after U(a, b) seconds
    max_in_a_row: int = 2      # never more faulted requests than this one after another
    paths: tuple[str, ...] = ()  # when given, only requests whose path holds one of them fail
    script: tuple[str, ...] = ()  # the fates of the first such requests, before any roll

    def __post_init__(self) -> None:
        if not 0 <= self.throttle + self.error + self.lost_reply <= 0.5:
            raise ValueError("fault shares must add up to at most 0.5: the clients must get through")


def status_reply(code: int, reason: str, retry_after: int | None = None) -> bytes:
    """A Kubernetes `Status` error response, as kube-apiserver sends one."""
    body = json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": f"{reason} (injected by the test proxy)", "reason": reason,
                       "code": code}).encode()
    headers = [f"HTTP/1.1 {code} {reason}", "Content-Type: application/json",
               f"Content-Length: {len(body)}", "Connection: close"]
    if retry_after is not None:
        headers.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


@dataclass
class Request:
    method: str
    target: str
    head: bytes  # rewritten for the upstream: Connection: close
    length: int | None  # Content-Length, None when the body is chunked or absent

    @property
    def is_watch(self) -> bool:
        query = self.target.partition("?")[2]
        return any(part in ("watch=true", "watch=1") for part in query.split("&"))

    @property
    def is_write(self) -> bool:
        return self.method in ("POST", "PUT", "PATCH", "DELETE")


def parse_head(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    kept, length = [lines[0]], None
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        key = name.strip().lower()
        if key in ("connection", "keep-alive", "proxy-connection"):
            continue
        if key == "content-length":
            length = int(value.strip())
        kept.append(line)
    kept.append("Connection: close")
    return Request(method, target, ("\r\n".join(kept) + "\r\n\r\n").encode("latin-1"), length)


class FaultyProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, faults: Faults | None = None,
                 server_tls: ssl.SSLContext | None = None,
                 upstream_tls: ssl.SSLContext | None = None, host: str = "127.0.0.1",
                 on_request: Callable[[Request], str | None] | None = None):
        self.upstream = (upstream_host, upstream_port)
        self.faults, self.server_tls, self.upstream_tls = faults, server_tls, upstream_tls
        self.on_request = on_request  # called in the proxy's thread first; "drop" cuts the request
        self.host, self.port = host, free_port()
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(faults.seed if faults else 0)
        self._in_a_row = self._matched = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="faulty-proxy")
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"{'https' if self.server_tls else 'http'}://{self.host}:{self.port}"

    # --- control, from any thread ----------------------------------------------------------

    def start(self) -> FaultyProxy:
        self._thread.start()
        self.up()
        return self

    def up(self) -> None:
        """Listen (again, on the same port)."""
        self._call(self._listen())

    def down(self) -> None:
        """As if the server died: refuse new connections and cut every open one."""
        self._call(self._close())

    def stop(self) -> None:
        if self._thread.is_alive():
            self.down()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _call(self, coroutine) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, self.host, self.port, limit=HEAD_LIMIT,
                                                      ssl=self.server_tls, reuse_address=True)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    # --- serving ---------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            if self.faults is None and self.on_request is None:
                await self._forward_raw(reader, writer)
            else:
                await self._serve_http(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError, ValueError):
            self.counts["broken_connections"] += 1
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _open_upstream(self):
        return await asyncio.open_connection(*self.upstream, ssl=self.upstream_tls,
                                             server_hostname=self.upstream[0] if self.upstream_tls else None)

    async def _forward_raw(self, reader, writer) -> None:
        up_reader, up_writer = await self._open_upstream()
        try:
            await _pipe_both(reader, writer, up_reader, up_writer)
        finally:
            up_writer.close()

    def _choose(self, request: Request) -> str:
        """The fate of one request: forward, throttle, error, lost_reply (seeded, bounded)."""
        faults = self.faults
        if faults.paths and not any(path in request.target for path in faults.paths):
            return "forward"
        self._matched += 1
        if self._matched <= len(faults.script):
            return faults.script[self._matched - 1]
        roll = self._rng.random()
        if self._in_a_row >= faults.max_in_a_row:
            fate = "forward"
        elif roll < faults.throttle:
            fate = "throttle"
        elif roll < faults.throttle + faults.error:
            fate = "error"
        elif roll < faults.throttle + faults.error + faults.lost_reply and request.is_write:
            fate = "lost_reply"
        else:
            fate = "forward"
        self._in_a_row = 0 if fate == "forward" else self._in_a_row + 1
        return fate

    async def _serve_http(self, reader, writer) -> None:
        request = parse_head(await reader.readuntil(b"\r\n\r\n"))
        self.counts["requests"] += 1
        fate = self.on_request(request) if self.on_request is not None else None
        if fate == "drop":  # the hook says: the connection breaks before the request goes on
            self.counts["dropped"] += 1
            return
        choosable = self.faults is not None and (request.length is not None or not request.is_write)
        fate = self._choose(request) if choosable else "forward"
        if fate in ("throttle", "error"):
            if request.length:
                await reader.readexactly(request.length)
            self.counts[fate] += 1
            writer.write(status_reply(429, "TooManyRequests", retry_after=1) if fate == "throttle"
                         else status_reply(500, "InternalError"))
            await writer.drain()
            return
        up_reader, up_writer = await self._open_upstream()
        try:
            up_writer.write(request.head)
            if fate == "lost_reply":
                up_writer.write(await reader.readexactly(request.length or 0))
                await up_writer.drain()
                await _drain(up_reader)  # the server did it; the client never hears so
                self.counts[fate] += 1
                writer.write(status_reply(500, "InternalError"))
                await writer.drain()
                return
            piping = _pipe_both(reader, writer, up_reader, up_writer)
            if request.is_watch and self.faults and self.faults.watch_cut:
                try:
                    await asyncio.wait_for(piping, self._rng.uniform(*self.faults.watch_cut))
                except asyncio.TimeoutError:
                    self.counts["watch_cut"] += 1
            else:
                await piping
        finally:
            up_writer.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()


async def _drain(reader: asyncio.StreamReader) -> None:
    while await reader.read(CHUNK):
        pass


async def _pipe_both(reader, writer, up_reader, up_writer) -> None:
    """Bytes both ways until the server's side ends (the client's may end first: a half close)."""
    to_server = asyncio.ensure_future(_copy(reader, up_writer))
    try:
        await _copy(up_reader, writer)
    finally:
        to_server.cancel()
        await asyncio.gather(to_server, return_exceptions=True)
