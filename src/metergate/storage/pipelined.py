"""The hot path: one shared, pipelined Redis connection per event loop, replies parsed by hiredis.

Every coroutine writes its command to the same socket at once and waits for its reply in order
(Redis answers a connection's commands in the order they arrive). No pool, no per-call locking,
no retries: a lost connection fails the calls in flight with StorageUnavailable, whose outcome
is unknown to the caller, and the next call reconnects.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis

from metergate.core.errors import StorageUnavailable

__all__ = ["PipelinedConnection", "RedisReplyError"]


class RedisReplyError(Exception):
    """Redis answered with an error reply (NOSCRIPT, a script error, WRONGTYPE...)."""


def _encode(args: tuple[str | bytes, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self, lost: asyncio.Future[None]) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", errors="surrogateescape")
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            future = self.waiting.popleft()
            # A caller that timed out left its future here so later replies stay aligned.
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
                future.set_exception(StorageUnavailable("connection to Redis lost"))
        if not self.lost.done():
            self.lost.set_result(None)


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
        lost: asyncio.Future[None] = loop.create_future()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Protocol(lost), self.host, self.port, ssl=self.ssl or None
                ),
                self.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"cannot connect to Redis at {self.host}:{self.port}") from exc
        setup: list[tuple[str, ...]] = []
        if self.password:
            auth = (
                ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
            )
            setup.append(auth)
        if self.db:
            setup.append(("SELECT", str(self.db)))
        for command in setup:
            await self._send(protocol, command)
        return protocol

    async def _get(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # a connection belongs to the event loop that made it
            self._loop, self._protocol, self._connecting = loop, None, None
        if self._protocol is not None and self._protocol.transport is not None:
            return self._protocol
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            self._protocol = await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None
        return self._protocol

    @staticmethod
    async def _send(protocol: _Protocol, args: tuple[str | bytes, ...]) -> Any:
        if protocol.transport is None:
            raise StorageUnavailable("connection to Redis lost")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol.waiting.append(future)
        protocol.transport.write(_encode(args))
        return await future

    async def call(self, *args: str | bytes) -> Any:
        """Send one command and return its reply (an error reply raises RedisReplyError)."""
        protocol = await self._get()
        return await self._send(protocol, args)

    async def aclose(self) -> None:
        """Close the connection; calls in flight fail with StorageUnavailable."""
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
