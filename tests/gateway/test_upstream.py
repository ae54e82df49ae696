"""The proxy's upstream client against scripted HTTP/1.1 servers: framing, reuse, caps, deadlines."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from metergate.upstream import Response, UpstreamError, UpstreamPool, UpstreamTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Scripted:
    """A TCP server whose connections are handled by `handler(reader, writer, index)`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        try:
            await self.handler(reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """Read one request (head and body, Content-Length or chunked) and record it."""
        head = await reader.readuntil(b"\r\n\r\n")
        lower = head.lower()
        body = b""
        if b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                body += (await reader.readexactly(size + 2))[:-2]
                if size == 0:
                    break
        elif b"content-length:" in lower:
            length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body


def pool_for(server: Scripted, **kwargs: Any) -> UpstreamPool:
    options: dict[str, Any] = {"connect_timeout_s": 2, "read_timeout_s": 2, "write_timeout_s": 2}
    return UpstreamPool("127.0.0.1", server.port, **{**options, **kwargs})


async def read_all(response: Response) -> bytes:
    out = b""
    more = True
    while more:
        data, more = await response.read()
        out += data
    return out


def answering(*responses: bytes) -> Callable[[Scripted], Handler]:
    """A handler that reads a request and answers with the next of `responses`, until none left."""

    def make(server: Scripted) -> Handler:
        left = list(responses)

        async def handle(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
        ) -> None:
            while left:
                await server.read_request(reader)
                writer.write(left.pop(0))
                await writer.drain()
            await reader.read()  # until the client closes

        return handle

    return make


async def run_with(make: Callable[[Scripted], Handler], body: Callable[[Scripted], Any]) -> Any:
    server = Scripted(lambda r, w, i: asyncio.sleep(0))
    server.handler = make(server)
    async with server:
        return await body(server)


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


def test_content_length_responses_reuse_one_connection() -> None:
    async def check(server: Scripted) -> None:
        pool = pool_for(server)
        for _ in range(3):
            response = await pool.request(b"GET", b"/a?b=1", [(b"x-one", b"1")])
            assert response.status == 200
            assert await read_all(response) == b"hello"
            response.release()
        assert server.connections == 1
        assert server.requests[0].startswith(b"GET /a?b=1 HTTP/1.1\r\nhost: 127.0.0.1:")
        assert b"\r\nx-one: 1\r\n" in server.requests[0]
        await pool.aclose()

    asyncio.run(run_with(answering(OK, OK, OK), check))


def test_chunked_response_with_trailers() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\nx-usage: 7\r\n\r\n"
    )

    async def check(server: Scripted) -> None:
        pool = pool_for(server)
        for _ in range(2):
            response = await pool.request(b"GET", b"/", [])
            assert response.chunked
            assert await read_all(response) == b"abcde"
            assert response.trailers == [(b"x-usage", b"7")]
            assert (b"x-usage", b"7") not in response.headers
            response.release()
        assert server.connections == 1

    asyncio.run(run_with(answering(chunked, chunked), check))


def test_close_delimited_response_ends_at_close_and_is_not_reused() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"the end")

    server = Scripted(handle)

    async def check() -> None:
        async with server:
            pool = pool_for(server)
            response = await pool.request(b"GET", b"/", [])
            assert response.close_delimited
            assert await read_all(response) == b"until the end"
            response.release()
            assert pool.open == 0 and not pool.idle

    asyncio.run(check())


def test_head_and_bodiless_statuses() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"
    no_content = b"HTTP/1.1 204 No Content\r\n\r\n"
    not_modified = b"HTTP/1.1 304 Not Modified\r\ncontent-length: 1000\r\n\r\n"

    async def check(server: Scripted) -> None:
        pool = pool_for(server)
        for method in (b"GET", b"GET"):
            response = await pool.request(method, b"/", [])
            assert response.status in (204, 304)
            assert await read_all(response) == b""
            response.release()
        assert server.connections == 1  # 204 and 304 end after their heads: reusable
        response = await pool.request(b"HEAD", b"/", [])
        assert response.status == 200
        assert await read_all(response) == b""
        response.release()
        assert pool.open == 0  # a HEAD response's connection is not reused

    asyncio.run(run_with(answering(no_content, not_modified, head), check))


def test_interim_responses_are_skipped() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + OK

    async def check(server: Scripted) -> None:
        pool = pool_for(server)
        response = await pool.request(b"GET", b"/", [])
        assert response.status == 200
        assert response.headers == [(b"content-length", b"5")]
        assert await read_all(response) == b"hello"
        response.release()

    asyncio.run(run_with(answering(interim), check))


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nbad header\r\n\r\nhello",
        b"nonsense\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"x-big: " + b"a" * 70_000 + b"\r\ncontent-length: 0\r\n\r\n",
    ],
)
def test_ambiguous_or_broken_responses_are_errors(answer: bytes) -> None:
    async def check(server: Scripted) -> None:
        pool = pool_for(server)
        with pytest.raises(UpstreamError):
            response = await pool.request(b"GET", b"/", [])
            await read_all(response)
        assert pool.open == 0

    asyncio.run(run_with(answering(answer), check))


def test_bytes_after_a_response_make_its_connection_unusable() -> None:
    extra = OK + b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nworld"

    async def check(server: Scripted) -> None:
        pool = pool_for(server)
        response = await pool.request(b"GET", b"/", [])
        assert await read_all(response) == b"hello"
        response.release()
        assert pool.open == 0 and not pool.idle

    asyncio.run(run_with(answering(extra), check))


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        (b"/", [(b"x-a", b"1\r\nx-injected: 1")]),
        (b"/", [(b"x-a", b"1\rx")]),
        (b"/", [(b"x-a\r\nx-b", b"1")]),
        (b"/", [(b"x-a", b"1\nx-b: 2")]),
        (b"/ HTTP/1.1\r\nx: y", []),
        (b"/a b", []),
        (b"/", [(b"x-a", b"\0")]),
    ],
)
def test_fields_that_would_break_framing_are_never_sent(
    target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    async def check(server: Scripted) -> None:
        pool = pool_for(server)
        with pytest.raises(UpstreamError):
            await pool.request(b"GET", target, headers)
        assert server.connections == 0

    asyncio.run(run_with(answering(OK), check))


def test_request_bodies_are_framed_by_length_or_chunked() -> None:
    async def body(*chunks: bytes) -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async def check(server: Scripted) -> None:
        pool = pool_for(server)
        response = await pool.request(b"POST", b"/", [], body(b"ab", b"c"), content_length=3)
        await read_all(response)
        response.release()
        response = await pool.request(b"POST", b"/", [], body(b"ab", b"", b"cd"))
        await read_all(response)
        response.release()
        assert server.connections == 1
        first, second = server.requests
        assert b"content-length: 3\r\n" in first and first.endswith(b"\r\n\r\nabc")
        assert b"transfer-encoding: chunked\r\n" in second and second.endswith(b"abcd")
        assert b"content-length" not in second
        with pytest.raises(UpstreamError):  # fewer bytes than declared: never sent as complete
            await pool.request(b"POST", b"/", [], body(b"ab"), content_length=3)
        with pytest.raises(UpstreamError):
            await pool.request(b"POST", b"/", [], body(b"abcd"), content_length=3)
        assert pool.open == 0

    asyncio.run(run_with(answering(OK, OK), check))


def test_the_pool_is_capped_and_waiting_for_it_has_a_deadline() -> None:
    async def check(server: Scripted) -> None:
        pool = pool_for(server, max_connections=1)
        held = await pool.request(b"GET", b"/", [])
        with pytest.raises(UpstreamTimeout):
            await pool.request(b"GET", b"/", [], timeout_s=0.2)
        assert server.connections == 1
        waiting = asyncio.ensure_future(pool.request(b"GET", b"/", [], timeout_s=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        assert await read_all(held) == b"hello"
        held.release()
        response = await waiting
        assert await read_all(response) == b"hello"
        response.release()
        assert server.connections == 1  # the waiter got the released connection

    asyncio.run(run_with(answering(OK, OK), check))


def test_a_closed_connection_frees_its_place_for_a_waiter() -> None:
    async def check(server: Scripted) -> None:
        pool = pool_for(server, max_connections=1)
        held = await pool.request(b"GET", b"/", [])
        waiting = asyncio.ensure_future(pool.request(b"GET", b"/", [], timeout_s=5))
        await asyncio.sleep(0.05)
        held.close()
        response = await waiting
        assert await read_all(response) == b"hello"
        response.release()
        assert pool.open == 1

    asyncio.run(run_with(answering(OK, OK), check))


def test_an_upstream_that_does_not_answer_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await reader.read()

    async def check() -> None:
        async with Scripted(silent) as server:
            pool = pool_for(server, read_timeout_s=0.2)
            with pytest.raises(UpstreamTimeout):
                await pool.request(b"GET", b"/", [])
            assert pool.open == 0

    asyncio.run(check())


def test_a_body_that_stalls_mid_way_times_out() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
        await reader.read()

    async def check() -> None:
        async with Scripted(stall) as server:
            pool = pool_for(server, read_timeout_s=0.2)
            response = await pool.request(b"GET", b"/", [])
            assert await response.read() == (b"hello", True)
            with pytest.raises(UpstreamTimeout):
                await response.read()
            response.release()
            assert pool.open == 0

    asyncio.run(check())


def test_an_upstream_that_does_not_read_the_body_times_out() -> None:
    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await asyncio.sleep(10)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(1000):
            yield b"x" * 65536

    async def check() -> None:
        async with Scripted(deaf) as server:
            pool = pool_for(server, write_timeout_s=0.2, read_timeout_s=0.2)
            with pytest.raises(UpstreamTimeout):
                await pool.request(b"POST", b"/", [], body())
            assert pool.open == 0

    asyncio.run(check())


def test_unreachable_upstream_is_an_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def check() -> None:
        pool = UpstreamPool("127.0.0.1", port, connect_timeout_s=2)
        with pytest.raises(UpstreamError) as caught:
            await pool.request(b"GET", b"/", [])
        assert not isinstance(caught.value, UpstreamTimeout)
        assert pool.open == 0

    asyncio.run(check())


def test_only_idempotent_requests_without_a_body_are_retried_on_a_stale_connection() -> None:
    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int
    ) -> None:
        while True:
            await server.read_request(reader)
            writer.write(OK)
            await writer.drain()
            if index in (0, 2):  # then read the next request and close without answering
                await server.read_request(reader)
                return

    server = Scripted(handle)

    async def body() -> AsyncIterator[bytes]:
        yield b"x"

    async def check() -> None:
        async with server:
            pool = pool_for(server)
            response = await pool.request(b"GET", b"/", [])
            await read_all(response)
            response.release()
            response = await pool.request(b"GET", b"/", [])  # stale, then a new connection
            assert await read_all(response) == b"hello"
            response.release()
            assert server.connections == 2
            one = await pool.request(b"GET", b"/", [])  # the good connection, held
            two = await pool.request(b"GET", b"/", [])  # a third, stale after this
            for response in (one, two):
                await read_all(response)
                response.release()
            with pytest.raises(UpstreamError):
                await pool.request(b"POST", b"/", [], body(), content_length=1)
            assert server.connections == 3  # not sent twice

    asyncio.run(check())


def test_an_early_answer_ends_the_upload() -> None:
    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(20):
            await asyncio.sleep(0.02)
            yield b"x" * 100

    async def check() -> None:
        async with Scripted(early) as server:
            pool = pool_for(server)
            response = await pool.request(b"POST", b"/", [], body(), content_length=2000)
            assert response.status == 413
            assert not response.sent_whole
            assert await read_all(response) == b""
            response.release()
            assert pool.open == 0

    asyncio.run(check())


def test_closing_a_close_delimited_response_is_not_its_end() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nmore")
        await reader.read()

    async def check() -> None:
        async with Scripted(endless) as server:
            pool = pool_for(server)
            response = await pool.request(b"GET", b"/", [])
            assert await response.read() == (b"more", True)
            response.close()
            await asyncio.sleep(0.05)
            with pytest.raises(UpstreamError):
                await response.read()
            assert not response.complete

    asyncio.run(check())


def proxy_messages(port: int, scope: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one request through ProxyApp (no metering) in front of 127.0.0.1:port."""
    from metergate import parse_config
    from metergate.proxy import ProxyApp

    app = ProxyApp(parse_config({"proxy": {"upstream": f"http://127.0.0.1:{port}"}}))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    base = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/t",
        "raw_path": b"/t",
        "query_string": b"",
        "headers": [(b"host", b"gw")],
        "client": ("127.0.0.1", 5000),
    }

    async def run() -> None:
        await app({**base, **scope}, receive, send)
        await app.aclose()

    asyncio.run(run())
    return sent


TRAILED = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ndate: x\r\nx-kept: 1\r\n\r\n"
    b"2\r\nhi\r\n0\r\nx-usage-tokens: 12\r\n\r\n"
)


def test_the_proxy_forwards_trailers_when_its_server_can_send_them() -> None:
    async def serve(body: Callable[[int], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        server = Scripted(lambda r, w, i: asyncio.sleep(0))
        server.handler = answering(TRAILED)(server)
        async with server:
            return await asyncio.to_thread(body, server.port)

    with_ext = asyncio.run(
        serve(lambda port: proxy_messages(port, {"extensions": {"http.response.trailers": {}}}))
    )
    start, *bodies, trailers = with_ext
    assert start["trailers"] is True
    assert start["headers"] == [(b"x-kept", b"1")]  # no Transfer-Encoding, no Date
    assert b"".join(m["body"] for m in bodies) == b"hi" and not bodies[-1]["more_body"]
    assert trailers == {
        "type": "http.response.trailers",
        "headers": [(b"x-usage-tokens", b"12")],
        "more_trailers": False,
    }
    without = asyncio.run(serve(lambda port: proxy_messages(port, {})))
    assert "trailers" not in without[0]
    assert [m["type"] for m in without[1:]] == ["http.response.body"] * (len(without) - 1)
