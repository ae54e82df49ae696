"""The blocking hot path: lean connections to one Redis node, shared by any number of threads.

A call takes an idle connection (or opens one), writes its command with one `sendall`, reads its
reply (parsed by hiredis) and hands the connection back. One thread uses a connection at a time;
handing connections over is a deque's atomic pop and append, with no lock. No retries: a call is
sent at most once, because a mutation sent twice could apply twice.

Failure handling:

- A call without its reply within the timeout raises StorageUnavailable ("outcome unknown") and its
  connection is closed, so that its late reply can never be read by a later call. Any other
  network error closes the connection too; the next call connects afresh.
- A connection is checked before each use, without waiting: Redis restarted meanwhile (or its
  `timeout`, or CLIENT KILL) has closed it, and a command sent into it would turn a call that
  never ran into one whose outcome is unknown.
- Connecting (TCP, AUTH, SELECT) is bounded by `connect_timeout_s`.
- After a fork, the child drops the connections it inherited: they belong to the parent.

System calls are few because each one that may block lets the GIL go, and under a thread pool
every hand-over of the GIL costs a thread switch. A call makes two (send, receive). The timeouts
are the kernel's (SO_RCVTIMEO, SO_SNDTIMEO) where it has them: Python's own socket timeout polls
before every send and every receive. On Linux the check before use reads the connection's TCP
state (TCP_INFO), which keeps the GIL; elsewhere it is a poll.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import time
import weakref
from collections import deque
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis

from metergate.core.errors import StorageUnavailable
from metergate.storage.pipelined import RedisReplyError, pack

__all__ = ["BlockingClient", "RedisReplyError"]


# The kernel's timeouts on a blocking socket: one system call per send and per receive.
_KERNEL_TIMEOUTS = sys.platform.startswith(("linux", "darwin")) and hasattr(socket, "SO_RCVTIMEO")
_BUFFER = 65536
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None) if sys.platform == "linux" else None
_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of struct tcp_info


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    micros = int((seconds - whole) * 1_000_000)
    if whole == 0 and micros == 0:
        micros = 1  # a zero timeval means "wait forever"
    return struct.pack("@ll", whole, micros)


class _Connection:
    """One socket and its reply parser; used by one thread at a time."""

    __slots__ = ("generation", "poller", "reader", "sock")

    def __init__(self, sock: socket.socket, generation: int) -> None:
        self.sock = sock
        self.generation = generation
        self.reader = hiredis.Reader(encoding="utf-8", errors="surrogateescape")
        self.poller: Any = None
        if _TCP_INFO is None and hasattr(select, "poll"):
            self.poller = select.poll()
            self.poller.register(sock, select.POLLIN)

    def usable(self) -> bool:
        """Whether Redis still has the connection open: nothing closed it while it was idle.

        TCP_INFO says ESTABLISHED until Redis's FIN or RST arrives. A poll says readable on end
        of stream, or on bytes nobody asked for; either way the connection is not ours to use.
        """
        try:
            if _TCP_INFO is not None:
                state = self.sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)
                return state[0] == _TCP_ESTABLISHED
            if self.poller is not None:
                return not self.poller.poll(0)
            readable, _, _ = select.select([self.sock], [], [], 0)
            return not readable
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


# Every client, for the fork hook (weakly: a client nobody uses any more may go).
_clients: weakref.WeakSet[BlockingClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child's copies of the parent's sockets: closing them leaves the parent's untouched.
    for client in list(_clients):
        client.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_all(idle: deque[_Connection]) -> None:
    while True:
        try:
            conn = idle.pop()
        except IndexError:
            return
        conn.close()


class BlockingClient:
    """Connections to one Redis node (`redis://[user:password@]host[:port][/db]`); `call` blocks.

    `timeout_s` bounds each call (its outcome is unknown after it), `connect_timeout_s` each
    connection attempt (TCP, AUTH, SELECT).
    """

    def __init__(self, url: str, *, timeout_s: float, connect_timeout_s: float = 1.0) -> None:
        parsed = urlparse(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 6379
        db = parsed.path.strip("/")
        self.db = int(db) if db.isdigit() else 0
        self.password = unquote(parsed.password) if parsed.password else None
        self.username = unquote(parsed.username) if parsed.username else None
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._idle: deque[_Connection] = deque()
        # Bumped by close(): a connection of an older generation is closed instead of reused.
        self._generation = 0
        _clients.add(self)
        # A client dropped without close() (a middleware nobody shuts down) closes its sockets.
        weakref.finalize(self, _close_all, self._idle)

    def _connect(self) -> _Connection:
        where = f"{self.host}:{self.port}"
        try:
            sock = socket.create_connection((self.host, self.port), self.connect_timeout_s)
        except OSError as exc:
            raise StorageUnavailable(f"cannot connect to Redis at {where}: {exc}") from exc
        conn = _Connection(sock, self._generation)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._set_timeout(sock, self.connect_timeout_s)
            setup: list[tuple[str, ...]] = []
            if self.password:
                auth = ("AUTH", self.username) if self.username else ("AUTH",)
                setup.append((*auth, self.password))
            if self.db:
                setup.append(("SELECT", str(self.db)))
            for command in setup:
                reply = self._exchange(conn, pack(command), self.connect_timeout_s)
                if isinstance(reply, hiredis.ReplyError):
                    conn.close()
                    raise StorageUnavailable(f"Redis at {where} refused us: {reply}")
            self._set_timeout(sock, self.timeout_s)
        except StorageUnavailable:  # the setup's own (the connection is closed already)
            raise
        except OSError as exc:
            conn.close()
            raise StorageUnavailable(f"cannot set up a connection to Redis at {where}") from exc
        return conn

    @staticmethod
    def _set_timeout(sock: socket.socket, seconds: float, *, sending: bool = True) -> None:
        if _KERNEL_TIMEOUTS:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
                if sending:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))
            except OSError:
                pass  # a timeval this platform does not take: Python's own timeout instead
            else:
                sock.settimeout(None)  # blocking, bounded by the kernel
                return
        sock.settimeout(seconds)

    @classmethod
    def _exchange(cls, conn: _Connection, data: bytes, timeout_s: float) -> Any:
        """Send `data` and read one reply; on any failure the connection is closed."""
        sock = conn.sock
        reader = conn.reader
        deadline = time.monotonic() + timeout_s
        stretched = False
        try:
            sock.sendall(data)
            received = sock.recv(_BUFFER)
            while True:
                if not received:
                    raise ConnectionResetError("Redis closed the connection")
                reader.feed(received)
                reply = reader.gets()
                if reply is not False:
                    break
                # A reply in pieces: the timeout restarts with every receive, so what is left
                # of the call's budget bounds the next one.
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                cls._set_timeout(sock, left, sending=False)
                stretched = True
                received = sock.recv(_BUFFER)
            if reader.gets() is not False:
                # More than one reply to one command: the stream is out of step with its calls.
                raise ConnectionResetError("Redis sent a reply nobody asked for")
            if stretched:
                cls._set_timeout(sock, timeout_s, sending=False)
        except (TimeoutError, BlockingIOError):
            # Python's timeout, or the kernel's (EAGAIN on a blocking socket): close the socket,
            # or the late reply would be read by the next call.
            conn.close()
            raise StorageUnavailable(
                f"Redis did not answer within {round(timeout_s * 1000)} ms; the outcome is unknown"
            ) from None
        except (OSError, hiredis.ProtocolError) as exc:
            conn.close()
            raise StorageUnavailable(
                f"connection to Redis lost ({exc}); the outcome is unknown"
            ) from exc
        except BaseException:
            conn.close()  # interrupted: the reply may still come, and must not be read by others
            raise
        return reply

    def call(self, *args: str | bytes | int) -> Any:
        """Send one command and return its reply (an error reply raises RedisReplyError).

        A network failure or a timeout raises StorageUnavailable: the outcome is unknown.
        """
        data = pack(args)
        idle = self._idle
        generation = self._generation
        while True:
            try:
                conn = idle.pop()
            except IndexError:
                conn = self._connect()
                break
            if conn.generation == generation and conn.usable():
                break
            conn.close()
        reply = self._exchange(conn, data, self.timeout_s)
        if conn.generation == self._generation:
            idle.append(conn)
        else:
            conn.close()
        if type(reply) is hiredis.ReplyError:
            raise RedisReplyError(str(reply))
        return reply

    def close(self) -> None:
        """Close the idle connections; those in use are closed when their call ends."""
        self._generation += 1
        _close_all(self._idle)
