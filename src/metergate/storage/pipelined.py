"""The hot path: one shared, pipelined Redis connection per event loop, replies parsed by hiredis.

Every coroutine writes its command to the same socket at once and waits for its reply in order
(Redis answers a connection's commands in the order they arrive). No pool, no per-call locking,
no retries: a lost connection fails the calls in flight with StorageUnavailable, whose outcome
is unknown to the caller, and the next call reconnects.

Failure handling, in order of what can go wrong:

- A call that gets no reply within its timeout fails with StorageUnavailable ("outcome unknown").
  Its future stays queued, so its late reply is consumed and dropped, never handed to the next
  caller (the same holds for a caller cancelled from outside, e.g. by `asyncio.wait_for`).
- When not a single reply arrived on the connection during a whole timeout while calls were
  waiting, Redis is stalled (SIGSTOP, a long fork, a swap storm) or the link is dead without a
  FIN (a partition, a crashed host): the connection is aborted, every call in flight fails at
  once, and the next call connects afresh instead of queueing behind a dead socket forever.
- Connecting (TCP, AUTH, SELECT) is bounded by `connect_timeout_s` and by the caller's timeout.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast
from urllib.parse import unquote, urlparse

import hiredis

from metergate.core.errors import StorageUnavailable

__all__ = ["PipelinedConnection", "RedisReplyError", "pack"]


def pack(args: tuple[str | bytes | int, ...]) -> bytes:
    """RESP-encode one command, in C (hiredis's type stub declares a 1-tuple, hence the cast)."""
    return hiredis.pack_command(cast(Any, args))  # type: ignore[no-any-return]


class RedisReplyError(Exception):
    """Redis answered with an error reply (NOSCRIPT, a script error, WRONGTYPE...)."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", errors="surrogateescape")
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.replies = 0  # replies received so far: progress, for the stall detector
        # Requests of one event-loop iteration, sent together by one write (one system call,
        # and Redis reads them in one go) when the iteration's callbacks are done.
        self.outgoing: list[bytes] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport has the whole Transport API without subclassing asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        self.loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self.outgoing:
            assert self.loop is not None
            self.loop.call_soon(self.flush)
        self.outgoing.append(data)

    def flush(self) -> None:
        data, self.outgoing = self.outgoing, []
        transport = self.transport
        # A connection lost meanwhile fails the waiting calls itself (connection_lost).
        if data and transport is not None and not transport.is_closing():
            transport.write(data[0] if len(data) == 1 else b"".join(data))

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            self.replies += 1
            future = self.waiting.popleft()
            # A caller that timed out (or was cancelled) left its future here so that later
            # replies stay aligned: its late reply is dropped.
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(RedisReplyError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(
                    StorageUnavailable("connection to Redis lost; the outcome is unknown")
                )

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()


def _expire(protocol: _Protocol, future: asyncio.Future[Any], replies: int, ms: int) -> None:
    """A call's timeout: fail it, and abort the connection if nothing came back meanwhile."""
    if not future.done():
        future.set_exception(
            StorageUnavailable(f"Redis did not answer within {ms} ms; the outcome is unknown")
        )
    if protocol.replies == replies and protocol.transport is not None:
        # Not one reply during a whole timeout while this call waited: stalled or dead link.
        protocol.transport.abort()


class PipelinedConnection:
    """One multiplexed connection to one Redis node; `call` is safe from any number of tasks."""

    def __init__(self, url: str, *, connect_timeout_s: float = 1.0) -> None:
        parsed = urlparse(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 6379
        self.db = int(parsed.path.strip("/") or 0) if parsed.path.strip("/").isdigit() else 0
        self.password = unquote(parsed.password) if parsed.password else None
        self.username = unquote(parsed.username) if parsed.username else None
        self.ssl = parsed.scheme == "rediss"
        self.connect_timeout_s = connect_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                transport, protocol = await loop.create_connection(
                    _Protocol, self.host, self.port, ssl=self.ssl or None
                )
                try:
                    setup: list[tuple[str, ...]] = []
                    if self.password:
                        setup.append(
                            ("AUTH", self.username, self.password)
                            if self.username
                            else ("AUTH", self.password)
                        )
                    if self.db:
                        setup.append(("SELECT", str(self.db)))
                    for command in setup:
                        await self._send(protocol, command, None)
                except BaseException:
                    transport.abort()
                    raise
        except (OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"cannot connect to Redis at {self.host}:{self.port}") from exc
        except RedisReplyError as exc:
            raise StorageUnavailable(f"Redis at {self.host}:{self.port} refused us: {exc}") from exc
        return protocol

    async def _get(self, timeout: float | None) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # a connection belongs to the event loop that made it
            self._loop, self._protocol, self._connecting = loop, None, None
        if self._protocol is not None and self._protocol.usable:
            return self._protocol
        stale = self._connecting
        if stale is not None and stale.done() and (stale.cancelled() or stale.exception()):
            stale = None  # a failure nobody waited for is old news: connect afresh
        if stale is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        assert connecting is not None
        try:
            async with asyncio.timeout(timeout):
                self._protocol = await asyncio.shield(connecting)
        except TimeoutError:
            raise StorageUnavailable(
                f"cannot connect to Redis at {self.host}:{self.port} in time"
            ) from None
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None
        return self._protocol

    @staticmethod
    async def _send(
        protocol: _Protocol, args: tuple[str | bytes, ...], timeout: float | None
    ) -> Any:
        transport = protocol.transport
        if transport is None or transport.is_closing():
            raise StorageUnavailable("connection to Redis lost")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        protocol.waiting.append(future)
        protocol.write(pack(args))
        if timeout is None:
            return await future
        ms = round(timeout * 1000)
        handle = loop.call_later(timeout, _expire, protocol, future, protocol.replies, ms)
        try:
            return await future
        finally:
            # A caller cancelled from outside keeps the timer: it still detects a stall.
            if not future.cancelled():
                handle.cancel()

    async def connect(self, timeout: float | None = None) -> None:
        """Connect unless connected; StorageUnavailable if that fails (nothing was sent)."""
        await self._get(timeout)

    async def call(self, *args: str | bytes, timeout: float | None = None) -> Any:
        """Send one command and return its reply (an error reply raises RedisReplyError).

        With `timeout` (seconds), a call without a reply by then raises StorageUnavailable.
        """
        protocol = self._protocol
        if protocol is None or not protocol.usable or self._loop is not asyncio.get_running_loop():
            protocol = await self._get(timeout)
        return await self._send(protocol, args, timeout)

    async def aclose(self) -> None:
        """Close the connection; calls in flight fail with StorageUnavailable."""
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
