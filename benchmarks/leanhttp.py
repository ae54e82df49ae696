"""A lean pooled HTTP/1.1 client for one upstream origin: asyncio.Protocol + httptools, keep-alive.

A candidate upstream client for the reverse proxy. It does what a proxy needs and nothing more: no
URL parsing, no header models, no cookies, redirects or decompression. One request owns one
connection from write to the end of the body; finished keep-alive connections go back to the pool.

Semantics a proxy relies on:
- Request bodies go out with Content-Length when known, chunked otherwise.
- The response body is read as it arrives; reading pauses the socket above HIGH_WATER bytes.
- A request that fails on a reused connection before any response byte arrived is sent once more
  on a new connection if its body can be replayed (bytes or none): the server closed an idle
  connection, nothing was processed. Streamed bodies are never replayed.
- 1xx interim responses are skipped; a HEAD response ends after its headers (and its connection
  is not reused, since the parser cannot be told to expect no body).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools

__all__ = ["LeanPool", "Response", "UpstreamError", "UpstreamTimeout"]

HIGH_WATER = 256 * 1024
Headers = list[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """The upstream connection failed or sent something that is not HTTP/1.1."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within the read timeout."""


class Response(asyncio.Protocol):
    """One connection to the upstream, and the response being read on it."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._drained: asyncio.Future[None] | None = None
        self.reset(b"GET")

    def reset(self, method: bytes) -> None:
        """Prepare for the next response on this connection."""
        self.head = method == b"HEAD"
        self.status = 0
        self.headers: Headers = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = True
        self.received = False
        self.error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # no isinstance check: uvloop's transports do not subclass asyncio's
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError(f"invalid HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if not self.complete:
            self.fail(UpstreamError("the upstream closed the connection"))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.headers = []  # an interim response: the real one follows
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive() and not self.head
        self.headers_done = True
        if self.head:
            self.complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.complete = True
            self._wake()

    # reading

    def fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout_s: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = None
        if timeout_s is not None:
            timer = loop.call_later(
                timeout_s, self.fail, UpstreamTimeout("the upstream stalled mid-body")
            )
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _headers(self) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read(self, timeout_s: float | None = None) -> tuple[bytes, bool]:
        """Return the body bytes received so far (waiting for some) and whether more follow."""
        while not self.chunks and not self.complete:
            if self.error is not None:
                raise self.error
            await self._wait(timeout_s)
        if len(self.chunks) == 1:
            data = self.chunks.popleft()
        else:
            data = b"".join(self.chunks)
            self.chunks.clear()
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.resume_reading()
        self.buffered = 0
        return data, not self.complete

    async def write(self, data: bytes) -> None:
        if self.transport is None:
            raise UpstreamError("the upstream closed the connection")
        self.transport.write(data)
        if self._drained is not None:
            await self._drained

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


class LeanPool:
    """Keep-alive connections to one upstream `host:port`; `request` is safe from any task."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_idle: int = 512,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
    ) -> None:
        self.host, self.port = host, port
        self.host_header = (host if port in (80, 443) else f"{host}:{port}").encode("latin-1")
        self.max_idle = max_idle
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.idle: list[Response] = []

    async def _connect(self) -> Response:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(Response, self.host, self.port), self.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return conn

    def _idle_connection(self) -> Response | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        return None

    def release(self, conn: Response) -> None:
        """Give a connection back after its response was read whole (or close it)."""
        if conn.complete and conn.keep_alive and not conn.closed and len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.close()

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: bytes | AsyncIterator[bytes] | None = None,
    ) -> Response:
        """Send a request; return once the response headers are in (read the body with `read`)."""
        lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method, target, self.host_header)]
        lines += [b"%s: %s\r\n" % (k, v) for k, v in headers]
        if isinstance(body, bytes):
            lines.append(b"content-length: %d\r\n\r\n%s" % (len(body), body))
        elif body is None:
            lines.append(b"\r\n")
        else:
            lines.append(b"transfer-encoding: chunked\r\n\r\n")
        head = b"".join(lines)
        replayable = not hasattr(body, "__aiter__")
        conn = self._idle_connection()
        if conn is not None:
            try:
                return await self._exchange(conn, method, head, body)
            except UpstreamError:
                conn.close()
                if conn.received or not replayable or isinstance(conn.error, UpstreamTimeout):
                    raise
        conn = await self._connect()
        try:
            return await self._exchange(conn, method, head, body)
        except BaseException:
            conn.close()
            raise

    async def _exchange(
        self, conn: Response, method: bytes, head: bytes, body: bytes | AsyncIterator[bytes] | None
    ) -> Response:
        conn.reset(method)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(
            self.read_timeout_s, conn.fail, UpstreamTimeout("the upstream did not answer in time")
        )
        try:
            await conn.write(head)
            if body is not None and not isinstance(body, bytes):
                async for chunk in body:
                    if chunk:
                        await conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await conn.write(b"0\r\n\r\n")
            await conn._headers()
        finally:
            timer.cancel()
        return conn
