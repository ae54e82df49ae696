"""Body costs at the message level: nothing held back, requests replayed as sent, trailers.

uvicorn (the suite's server) does not carry `http.response.trailers`, so these drive the
middleware directly with the messages a server would exchange.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from metergate import MeteringMiddleware
from metergate.bodytap import read_reserves_wsgi

from .test_body_costs import CONFIG, KEY

Message = dict[str, Any]
App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def config(cost: dict[str, Any]) -> dict[str, Any]:
    """The LLM test config with the tokens cost replaced, on fresh embedded storage."""
    cfg = copy.deepcopy(CONFIG)
    cfg["storage"] = {"url": f"memory://passthrough-{uuid.uuid4().hex}"}
    cfg["routes"][0]["meter"][1]["cost"] = cost
    return cfg


def scope(headers: dict[str, str] | None = None) -> dict[str, Any]:
    """An HTTP scope for POST /v1/chat/completions carrying the customer's key."""
    raw = [(k.encode(), v.encode()) for k, v in {**KEY, **(headers or {})}.items()]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": raw,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "extensions": {"http.response.trailers": {}},
    }


async def tokens(middleware: MeteringMiddleware) -> tuple[int, int]:
    """(tokens counted, tokens pending)."""
    usage = await middleware.meter.usage("acme", "tokens")
    return int(usage["value"]), int(usage["pending"])


def run(
    cost: dict[str, Any],
    app: Callable[[MeteringMiddleware], App],
    requests: list[Message],
    on_send: Callable[[MeteringMiddleware, Message], Awaitable[None]] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[list[Message], tuple[int, int]]:
    """Serve one request through the middleware; return the messages sent and (value, pending)."""
    sent: list[Message] = []

    async def main() -> tuple[int, int]:
        middleware = MeteringMiddleware(app(middleware_ref), config(cost))
        middleware_ref.append(middleware)
        pending = list(requests)

        async def receive() -> Message:
            if pending:
                return pending.pop(0)
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            sent.append(message)
            if on_send is not None:
                await on_send(middleware, message)

        await asyncio.wait_for(middleware(scope(headers), receive, send), 10)
        result = await tokens(middleware)
        await middleware.meter.aclose()
        return result

    middleware_ref: list[MeteringMiddleware] = []
    return sent, asyncio.run(main())


BODY = [{"type": "http.request", "body": b"", "more_body": False}]
JSON_COST = {"response_json": "/usage/total_tokens", "reserve": 50}
TRAILER_COST = {"response_trailer": "X-Usage-Tokens", "reserve": 50}


def test_each_chunk_goes_out_before_the_app_sends_the_next() -> None:
    """The middleware never holds a chunk back: the app waits for the client to have each one."""
    got = asyncio.Event()

    def app(_: Any) -> App:
        async def serve(scope: dict[str, Any], receive: Any, send: Any) -> None:
            start = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": start})
            for i in range(3):
                got.clear()
                event = {"usage": {"total_tokens": i + 1}}
                chunk = b"data: " + json.dumps(event).encode() + b"\n\n"
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await asyncio.wait_for(got.wait(), 2)  # times out if the chunk was held back
            await send({"type": "http.response.body", "body": b""})

        return serve

    async def on_send(_: MeteringMiddleware, message: Message) -> None:
        if message.get("body"):
            got.set()

    sent, (value, pending) = run(JSON_COST, app, BODY, on_send)
    assert [m.get("body", b"")[:6] for m in sent[1:]] == [b"data: "] * 3 + [b""]
    assert (value, pending) == (3, 0)


def test_request_is_replayed_to_the_app_message_by_message() -> None:
    """The request read ahead for its reserve reaches the app in the same messages, then the rest."""
    body = json.dumps({"messages": [], "max_tokens": 42}).encode()
    parts = [body[:10], body[10:25], body[25:]]
    requests = [
        {"type": "http.request", "body": p, "more_body": i < 2} for i, p in enumerate(parts)
    ]
    received: list[Message] = []
    held: list[tuple[int, int]] = []

    def app(ref: list[MeteringMiddleware]) -> App:
        async def serve(scope: dict[str, Any], receive: Any, send: Any) -> None:
            for _ in range(3):
                received.append(await receive())
            held.append(await tokens(ref[0]))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"no usage"})

        return serve

    cost = {
        "response_json": "/usage/total_tokens",
        "reserve": {"request_json": "/max_tokens", "default": 7},
    }
    _, result = run(cost, app, requests)
    assert received == requests
    assert held == [(0, 42)]
    assert result == (42, 0)


def test_client_gone_while_reading_ahead_is_neither_forwarded_nor_charged() -> None:
    """A client gone before its body arrived is not admitted: the app never runs, nothing held."""
    requests = [
        {"type": "http.request", "body": b'{"max_tok', "more_body": True},
        {"type": "http.disconnect"},
    ]
    received: list[Message] = []

    def app(_: Any) -> App:
        async def serve(scope: dict[str, Any], receive: Any, send: Any) -> None:
            received.append(await receive())

        return serve

    cost = {
        "response_json": "/usage/total_tokens",
        "reserve": {"request_json": "/max_tokens", "default": 7},
    }
    sent, result = run(cost, app, requests)
    assert received == [] and sent == []
    assert result == (0, 0)


def trailer_app(trailers: list[tuple[bytes, bytes]], checks: list[tuple[int, int]]) -> Any:
    """An app announcing trailers, sending two chunks, then the trailers."""

    def app(ref: list[MeteringMiddleware]) -> App:
        async def serve(scope: dict[str, Any], receive: Any, send: Any) -> None:
            assert "http.response.trailers" in scope["extensions"]
            start = {"type": "http.response.start", "status": 200, "headers": [], "trailers": True}
            await send(start)
            await send({"type": "http.response.body", "body": b"a", "more_body": True})
            await send({"type": "http.response.body", "body": b"b", "more_body": False})
            checks.append(await tokens(ref[0]))  # the body is over, the trailers are not
            await send({"type": "http.response.trailers", "headers": trailers})

        return serve

    return app


@pytest.mark.parametrize(
    ("trailers", "expected"),
    [([(b"x-usage-tokens", b"17")], 17), ([(b"x-usage-tokens", b"1.5")], 50), ([], 50)],
)
def test_trailer_prices_the_response_after_the_body(
    trailers: list[tuple[bytes, bytes]], expected: int
) -> None:
    """A trailer-priced cost settles after the trailers (its value, else the reserve)."""
    checks: list[tuple[int, int]] = []
    sent, result = run(TRAILER_COST, trailer_app(trailers, checks), BODY)
    assert checks == [(0, 50)]
    assert sent[-1]["type"] == "http.response.trailers"
    assert result == (expected, 0)


def wsgi_route() -> Any:
    """The compiled chat route of a config whose reserve is read from the request (default 7)."""
    from metergate import parse_config
    from metergate.core.http import RouteTable

    cost = {
        "response_json": "/usage/total_tokens",
        "reserve": {"request_json": "/max_tokens", "default": 7},
    }
    return RouteTable(parse_config(config(cost)).routes).routes[0]


class Terminated(io.BytesIO):
    """A server's input stream that ends with the body (`wsgi.input_terminated`)."""


@pytest.mark.parametrize("length", [True, False])
def test_wsgi_input_stays_whole_after_reading_ahead(length: bool) -> None:
    """After the reserve is read, the app reads the same bytes, by read, readline or iteration."""
    body = b'{"max_tokens": 42,\n "messages": []}\nsecond line\n'
    environ: dict[str, Any] = {"wsgi.input": Terminated(body)}
    headers = {"content-length": str(len(body))} if length else {}
    if not length:
        environ["wsgi.input_terminated"] = True
    reserves = read_reserves_wsgi(environ, wsgi_route(), headers)
    assert reserves == {"tokens": 7}  # a JSON document followed by text is not JSON
    stream = environ["wsgi.input"]
    assert stream.readline() == b'{"max_tokens": 42,\n'
    assert stream.read(5) == b' "mes'
    assert list(stream) == [b'sages": []}\n', b"second line\n"]
    assert stream.read() == b""


def test_wsgi_reads_ahead_only_up_to_the_limit() -> None:
    """An unterminated stream of unknown length is not read; a terminated one only to the limit."""
    route = wsgi_route()
    big = b'{"max_tokens": 3, "pad": "' + b"p" * (2 * 1024 * 1024) + b'"}'
    environ: dict[str, Any] = {"wsgi.input": io.BytesIO(big)}
    assert read_reserves_wsgi(environ, route, {}) == {"tokens": 7}
    assert environ["wsgi.input"].tell() == 0  # untouched
    environ = {"wsgi.input": io.BytesIO(big), "wsgi.input_terminated": True}
    assert read_reserves_wsgi(environ, route, {}) == {"tokens": 7}
    assert environ["wsgi.input"].read() == big
    small = b'{"max_tokens": 3}'
    environ = {"wsgi.input": io.BytesIO(small), "wsgi.input_terminated": True}
    assert read_reserves_wsgi(environ, route, {}) == {"tokens": 3}
    assert environ["wsgi.input"].read() == small
