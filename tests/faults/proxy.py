"""A fault-injecting TCP proxy in front of a real redis-server, on its own event loop thread.

It forwards bytes both ways untouched, parses what clients send (RESP arrays, with hiredis) to
count the commands it sees, and on request breaks one exchange on purpose:

- `arm("drop", "EVALSHA")`: forward the next EVALSHA to Redis (so the script runs), then close the
  client's connection when the reply comes back, without forwarding it: the reply is lost.
- `arm("hold", "EVALSHA")`: forward the next EVALSHA, then keep every reply of that connection
  to itself: the client sees a Redis that ran the script but never answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import hiredis


class FaultProxy:
    """Listen on a free loopback port and forward to `127.0.0.1:upstream_port`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.seen: list[str] = []
        self._armed: tuple[str, str] | None = None
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def count(self, command: str) -> int:
        """How many times a command went through the proxy."""
        return self.seen.count(command.upper())

    def arm(self, fault: str, command: str) -> None:
        """Break the next exchange of `command`: fault is "drop" or "hold"."""
        assert fault in ("drop", "hold")
        with self._lock:
            self._armed = (fault, command.upper())

    def _take(self, command: str) -> str | None:
        with self._lock:
            if self._armed is not None and self._armed[1] == command:
                fault, self._armed = self._armed[0], None
                return fault
        return None

    def start(self) -> FaultProxy:
        self._thread.start()

        async def listen() -> int:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(creader, cwriter))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self._writers.add(cwriter)
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cwriter.transport.abort()
            self._writers.discard(cwriter)
            return
        self._writers.add(swriter)
        state = {"drop": False, "hold": False}
        parser = hiredis.Reader()

        async def upstream() -> None:
            while data := await creader.read(65536):
                parser.feed(data)
                while (request := parser.gets()) is not False:
                    name = bytes(request[0]).decode().upper()
                    self.seen.append(name)
                    fault = self._take(name)
                    if fault is not None:
                        state[fault] = True  # set before the request leaves: its reply is next
                swriter.write(data)
                await swriter.drain()
            swriter.close()

        async def downstream() -> None:
            while data := await sreader.read(65536):
                if state["drop"]:
                    cwriter.transport.abort()
                    swriter.transport.abort()
                    return
                if state["hold"]:
                    continue
                cwriter.write(data)
                await cwriter.drain()
            cwriter.close()

        try:
            await asyncio.gather(upstream(), downstream())
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (cwriter, swriter):
                writer.transport.abort()
                self._writers.discard(writer)
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
