"""The reverse proxy's HTTP/1.1 client: a bounded keep-alive pool to one upstream origin.

It does what a proxy needs and nothing more (no URL parsing, header models, cookies, redirects or
decompression), on `asyncio.Protocol` and httptools' llhttp parser in its strict mode:

- **Bounded.** At most `max_connections` connections are open or being opened; a request past that
  waits for one, and a wait longer than its deadline ends in `UpstreamTimeout`.
- **Deadlines everywhere.** Connecting, waiting for the response head, each wait for the next body
  bytes and each wait for the upstream to take more request bytes are bounded.
- **Framing.** A request goes out with the Content-Length its client declared (and exactly that many
  bytes, or the connection is dropped) or chunked; a request head carrying CR or LF inside a field,
  or a target with spaces, is refused before anything is sent. Responses are read by llhttp, which
  refuses ambiguous framing (Content-Length with Transfer-Encoding, differing Content-Lengths,
  bad chunk sizes); bodies end by Content-Length, chunked encoding or the connection's close, and
  never for HEAD, 204 and 304. Interim 1xx responses are skipped; 101 is an error (the proxy never
  asks to upgrade). Trailers of a chunked body are kept apart from the head.
- **Reuse only when safe.** A connection goes back to the pool only when its response was read
  whole, the request was sent whole, both sides allow keep-alive, nothing arrived after the
  response, and it is not a HEAD response. Idle connections are dropped after `idle_timeout_s`
  (below common servers' keep-alive timeouts) and when the upstream closes them or sends anything.
- **Retries.** A request without a body and with an idempotent method that fails on a reused
  connection before any response byte arrived is sent once more on a new connection (the upstream
  closed an idle connection as it was picked). Nothing else is ever sent twice.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools

__all__ = ["Response", "UpstreamError", "UpstreamPool", "UpstreamTimeout"]

HIGH_WATER = 256 * 1024
"""Bytes of response body buffered before reading from the upstream pauses."""
MAX_HEAD_BYTES = 64 * 1024
"""The most bytes of field names and values a response head (or its trailers) may carry."""
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
Headers = list[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """The upstream could not be reached, failed, or answered with something that is not HTTP/1.1."""


class UpstreamTimeout(UpstreamError):
    """A deadline passed: connecting, waiting for a pooled connection, writing or reading."""


class Response(asyncio.Protocol):
    """One connection to the upstream, and the response being read on it."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._counted = True  # against the pool's max_connections, until closed
        self._drained: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.reset(b"GET")

    def reset(self, method: bytes) -> None:
        """Prepare for the next response on this connection."""
        self.head = method == b"HEAD"
        self.status = 0
        self.headers: Headers = []
        self.trailers: Headers = []
        self.head_bytes = 0
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = True
        self.close_delimited = False
        self.chunked = False
        self.received = False
        self.sent_whole = False
        self.error: Exception | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # no isinstance check: uvloop's transports do not subclass asyncio's
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.complete or self.pool.is_idle(self):
            # bytes nobody asked for: the connection's framing cannot be trusted any more
            self.keep_alive = False
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamError("the upstream switched protocols unasked"))
            self.close()
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError(f"invalid HTTP response from the upstream: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport: a half-closed upstream is done

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.headers_done and self.close_delimited and self.error is None:
            self.complete = True  # the body of a response without a length ends here
            self._wake()
        elif not self.complete:
            self.fail(UpstreamError("the upstream closed the connection"))
        self._forget()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            self.keep_alive = False
            raise UpstreamError("a second response to one request")  # stops the parser

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise UpstreamError("the upstream's response head is too large")
        if self.headers_done:
            self.trailers.append((name, value))
        else:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamError("the upstream switched protocols unasked")
            self.headers = []  # an interim response: the real one follows
            self.head_bytes = 0
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive() and not self.head
        self.headers_done = True
        self.head_bytes = 0  # trailers count on their own
        if self.head:
            self.complete = True
        elif status not in (204, 304):
            length = chunked = False
            for name, value in self.headers:
                lower = name.lower()
                if lower == b"content-length":
                    length = True
                elif lower == b"transfer-encoding":
                    chunked = value.rstrip().lower().endswith(b"chunked")
            self.chunked = chunked
            self.close_delimited = not length and not chunked
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.headers_done and not self.complete:
            self.complete = True
            self._wake()

    # state

    def fail(self, exc: Exception) -> None:
        if self.error is None and not self.complete:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout_s: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout_s, self.fail, UpstreamTimeout(what))
        try:
            await waiter
        finally:
            self._waiter = None
            timer.cancel()

    def _forget(self) -> None:
        self.closed = True
        if self._counted:
            self._counted = False
            self.pool._closed(self)

    @property
    def reusable(self) -> bool:
        """Whether this connection may carry another request."""
        return (
            self.complete
            and self.keep_alive
            and self.sent_whole
            and not self.closed
            and self.error is None
            and not self.chunks
        )

    # the caller's side

    async def read(self) -> tuple[bytes, bool]:
        """Return the body bytes received so far (waiting for some) and whether more follow.

        Raises UpstreamTimeout when nothing comes within the pool's read timeout, and
        UpstreamError when the connection breaks before the body is complete."""
        while not self.chunks and not self.complete:
            if self.error is not None:
                raise self.error
            await self._wait(self.pool.read_timeout_s, "the upstream stalled mid-body")
        if not self.chunks:
            return b"", False
        if len(self.chunks) == 1:
            data = self.chunks.popleft()
        else:
            data = b"".join(self.chunks)
            self.chunks.clear()
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.resume_reading()
        self.buffered = 0
        return data, not self.complete

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool if that is safe."""
        self.pool._release(self)

    def close(self) -> None:
        """Drop the connection (a response not read whole yet ends in an error, not short)."""
        self.fail(UpstreamError("the upstream connection was closed"))
        if self.transport is not None:
            self.transport.close()
        self._forget()

    async def _write(self, data: bytes) -> None:
        if self.transport is None or self.error is not None:
            raise self.error or UpstreamError("the upstream closed the connection")
        self.transport.write(data)
        if self._drained is not None:
            drained = self._drained
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self.pool.write_timeout_s, self._stalled, drained)
            try:
                await drained
            finally:
                timer.cancel()
            if self.error is not None:
                raise self.error

    def _stalled(self, drained: asyncio.Future[None]) -> None:
        self.fail(UpstreamTimeout("the upstream did not take the request body in time"))
        if not drained.done():
            drained.set_result(None)

    async def _head(self) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait(self.pool.read_timeout_s, "the upstream did not answer in time")


class UpstreamPool:
    """Keep-alive connections to one upstream `host:port`, at most `max_connections` of them."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int = 1000,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        write_timeout_s: float = 30.0,
        idle_timeout_s: float = 4.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.tls = tls
        default_port = 443 if tls is not None else 80
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal
        self.host_header = (name if port == default_port else f"{name}:{port}").encode("latin-1")
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.write_timeout_s = write_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.open = 0
        """Connections open or being opened: busy, idle and connecting."""
        self.idle: list[Response] = []
        self._idle_set: set[int] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    # bookkeeping

    def is_idle(self, conn: Response) -> bool:
        return id(conn) in self._idle_set

    def _closed(self, conn: Response) -> None:
        """A counted connection closed: its place in the pool is free."""
        self.open -= 1
        self._idle_set.discard(id(conn))
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _release(self, conn: Response) -> None:
        if conn.reusable and not self._closing:
            conn.idle_since = asyncio.get_running_loop().time()
            self.idle.append(conn)
            self._idle_set.add(id(conn))
            self._wake_one()
        else:
            conn.close()

    def _take_idle(self, now: float) -> Response | None:
        while self.idle:
            conn = self.idle.pop()
            self._idle_set.discard(id(conn))
            if conn.closed:
                continue
            if now - conn.idle_since > self.idle_timeout_s:
                conn.close()
                continue
            return conn
        return None

    async def _acquire(self, deadline: float, *, fresh: bool = False) -> Response:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._reset(loop)
        while True:
            now = loop.time()
            conn = None if fresh else self._take_idle(now)
            if conn is not None:
                conn.reused = True
                return conn
            if self.open < self.max_connections:
                return await self._connect(deadline)
            if now >= deadline:
                raise UpstreamTimeout("no upstream connection became free in time")
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise UpstreamTimeout("no upstream connection became free in time") from None
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, but not taking it: pass the turn on
                raise

    async def _connect(self, deadline: float) -> Response:
        loop = asyncio.get_running_loop()
        conn = Response(self)
        self.open += 1  # conn is counted until it is forgotten
        timeout_s = max(0.0, min(self.connect_timeout_s, deadline - loop.time()))
        try:
            async with asyncio.timeout(timeout_s):
                await loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                )
        except TimeoutError:
            conn.close()
            raise UpstreamTimeout(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            conn.close()
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _reset(self, loop: asyncio.AbstractEventLoop) -> None:
        """Forget connections of another (finished) event loop."""
        for conn in self.idle:
            conn._counted = False
            if conn.transport is not None:
                conn.transport.abort()
        self.idle.clear()
        self._idle_set.clear()
        self._waiters.clear()
        self.open = 0
        self._loop = loop
        self._closing = False

    # requests

    def head(self, method: bytes, target: bytes, headers: Headers, framing: bytes) -> bytes:
        """The request head; UpstreamError when a field or the target would break its framing."""
        parts = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method, target, self.host_header)]
        parts += [b"%s: %s\r\n" % pair for pair in headers]
        parts.append(framing)
        parts.append(b"\r\n")
        head = b"".join(parts)
        # every LF is one this method put there; CR, NUL or a space in the wrong place is refused
        if (
            head.count(b"\n") != len(headers) + 3 + framing.count(b"\n")
            or head.count(b"\r") != head.count(b"\n")
            or b"\0" in head
            or b" " in target
            or b" " in method
            or not target
        ):
            raise UpstreamError("a request field or the target cannot be sent as HTTP/1.1")
        return head

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | None = None,
        *,
        content_length: int | None = None,
        timeout_s: float | None = None,
    ) -> Response:
        """Send a request; return its response once the head is in (read the body with `read`,
        then `release` it).

        `body` streams with `content_length` bytes exactly when given, chunked otherwise;
        `timeout_s` bounds the wait for a pooled connection and the connect (the pool's connect
        timeout otherwise). Response heads arriving before the body is sent whole end the upload.
        """
        if body is None:
            framing = b"" if content_length is None else b"content-length: 0\r\n"
        elif content_length is not None:
            framing = b"content-length: %d\r\n" % content_length
        else:
            framing = b"transfer-encoding: chunked\r\n"
        data = self.head(method, target, headers, framing)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.connect_timeout_s if timeout_s is None else timeout_s)
        conn = await self._acquire(deadline)
        if conn.reused and body is None and method in IDEMPOTENT:
            try:
                return await self._exchange(conn, method, data, None, None)
            except UpstreamTimeout:
                conn.close()
                raise
            except UpstreamError:
                conn.close()
                if conn.received:
                    raise
            except BaseException:
                conn.close()
                raise
            conn = await self._acquire(
                max(deadline, loop.time() + self.connect_timeout_s), fresh=True
            )
        try:
            return await self._exchange(conn, method, data, body, content_length)
        except BaseException:
            conn.close()
            raise

    async def _exchange(
        self,
        conn: Response,
        method: bytes,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        length: int | None,
    ) -> Response:
        conn.reset(method)
        await conn._write(head)
        if body is not None:
            try:
                await self._upload(conn, body, length)
            except UpstreamTimeout:
                raise
            except UpstreamError:
                if conn.headers_done:
                    return conn  # answered early, then closed: the answer stands
                raise
            if not conn.sent_whole:
                return conn  # answered early: the rest is not sent, the connection not reused
        conn.sent_whole = True
        await conn._head()
        return conn

    async def _upload(self, conn: Response, body: AsyncIterator[bytes], length: int | None) -> None:
        sent = 0
        async for chunk in body:
            if conn.headers_done:
                return
            if not chunk:
                continue
            sent += len(chunk)
            if length is None:
                await conn._write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            elif sent > length:
                raise UpstreamError("the request body is longer than its Content-Length")
            else:
                await conn._write(chunk)
        if length is None:
            await conn._write(b"0\r\n\r\n")
        elif sent != length:
            raise UpstreamError("the request body is shorter than its Content-Length")
        conn.sent_whole = True

    async def aclose(self) -> None:
        """Close the idle connections; busy ones close when released."""
        self._closing = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()
        self._idle_set.clear()
