"""Costs read from bodies, wired into ASGI and WSGI: the request's reserve read ahead, the response
scanned as it passes through.

The request body is read ahead only as far as `max_scan_bytes`, and every byte read is handed to
the app afterwards as it came, so the app (or upstream) still receives a streamed request. The
response is never held back: each chunk is scanned and sent on.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from metergate.core.bodies import RequestBodyReader, ResponseScan
from metergate.core.http import CompiledRoute

__all__ = ["AsgiResponseTap", "WsgiResponseTap", "read_reserves_asgi", "read_reserves_wsgi"]

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]

WSGI_READ = 64 * 1024


async def read_reserves_asgi(
    receive: Receive, route: CompiledRoute, headers: Mapping[str, str]
) -> tuple[Receive, dict[str, int] | None]:
    """Read a route's request reserves from the body; return the `receive` the app must use.

    The messages read ahead (at most `max_scan_bytes` of body, plus one chunk) are replayed to the
    app first, then the rest comes from the client as it arrives. The reserves are None when the
    client went away before its body arrived: there is nothing to admit or to answer.
    """
    reader = RequestBodyReader(route.request_reserves, headers, route.request_scan_bytes)
    held: deque[Message] = deque()
    while reader.wanted:
        message = await receive()
        if message["type"] != "http.request":
            return receive, None
        held.append(message)
        reader.feed(message.get("body", b""), message.get("more_body", False))
    if not held:
        return receive, reader.result()

    async def replay() -> Message:
        if held:
            return held.popleft()
        return await receive()

    return replay, reader.result()


class _Prefixed(io.RawIOBase):
    """A request body: the bytes read ahead, then the rest of the server's input stream."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self._head = io.BytesIO(head)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self._head.read() + (self._rest.read() if self._rest is not None else b"")
        data = self._head.read(size)
        if len(data) < size and self._rest is not None:
            rest: bytes = self._rest.read(size - len(data))
            data += rest
        return data

    def readline(self, size: int | None = -1) -> bytes:
        line = self._head.readline(-1 if size is None else size)
        if (
            line.endswith(b"\n")
            or self._rest is None
            or (size is not None and 0 <= size <= len(line))
        ):
            return line
        more = -1 if size is None or size < 0 else size - len(line)
        rest: bytes = self._rest.readline(more)
        return line + rest

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


def read_reserves_wsgi(
    environ: dict[str, Any], route: CompiledRoute, headers: Mapping[str, str]
) -> dict[str, int]:
    """Read a route's request reserves from the body, leaving `wsgi.input` whole for the app."""
    reader = RequestBodyReader(route.request_reserves, headers, route.request_scan_bytes)
    if not reader.wanted:
        return reader.result()
    stream = environ.get("wsgi.input")
    length = (headers.get("content-length") or "").strip()
    if stream is None:
        reader.feed(b"", False)
        return reader.result()
    if length.isdigit():
        # With a Content-Length the server stops the stream there; without one, only a server
        # that says `wsgi.input_terminated` may be read to its end.
        data = stream.read(int(length)) if int(length) else b""
        reader.feed(data, False)
        environ["wsgi.input"] = io.BytesIO(data)
        return reader.result()
    if not environ.get("wsgi.input_terminated"):
        return reader.result()
    head: list[bytes] = []
    while reader.wanted:
        chunk = stream.read(WSGI_READ)
        head.append(chunk)
        reader.feed(chunk, bool(chunk))
    environ["wsgi.input"] = _Prefixed(b"".join(head), stream)
    return reader.result()


class AsgiResponseTap:
    """Scan an ASGI response's messages for the costs read from its body or trailers."""

    def __init__(self, route: CompiledRoute) -> None:
        self.costs = route.body_costs
        self.scan: ResponseScan | None = None

    def see(self, message: Message) -> None:
        """Look at a message the app sends, before it goes out."""
        kind = message["type"]
        if kind == "http.response.start":
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1")
                for k, v in message.get("headers", ())
            }
            self.scan = ResponseScan.start(self.costs, headers)
        elif self.scan is None:
            return
        elif kind == "http.response.body":
            self.scan.feed(message.get("body", b""))
            if not message.get("more_body", False):
                self.scan.finish()
        elif kind == "http.response.trailers":
            self.scan.trailers(
                [
                    (k.decode("latin-1").lower(), v.decode("latin-1"))
                    for k, v in message.get("headers", ())
                ]
            )

    def found(self) -> dict[str, int]:
        """The units read so far, per metric."""
        return self.scan.found() if self.scan is not None else {}


class WsgiResponseTap:
    """Scan a WSGI response body for the costs read from it (WSGI has no trailers)."""

    def __init__(self, route: CompiledRoute, response_headers: Mapping[str, str]) -> None:
        self.costs = route.body_costs
        self.response_headers = response_headers
        self.scan: ResponseScan | None = None

    def feed(self, chunk: bytes) -> None:
        """Scan the next chunk of the body (start_response has been called by then)."""
        if self.scan is None:
            self.scan = ResponseScan.start(self.costs, self.response_headers)
        self.scan.feed(chunk)

    def finish(self) -> None:
        """The whole body has passed."""
        if self.scan is None:
            self.scan = ResponseScan.start(self.costs, self.response_headers)
        self.scan.finish()

    def found(self) -> dict[str, int]:
        """The units read so far, per metric."""
        return self.scan.found() if self.scan is not None else {}
