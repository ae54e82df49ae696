"""The standalone reverse proxy, served for real in front of a real upstream, on every backend."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tests.adapters.harness import serve_asgi
from tests.builders import asset, counters, customer, metric, plan, route, tier

from conftest import Clock, with_storage
from metergate import Meter, create_app

KEY = "gw-key"


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse(
        {
            "path": request.url.path,
            "raw_path": request.scope.get("raw_path", b"").decode("latin-1"),
            "query": request.url.query,
            "length": len(body),
            "headers": [[k, v] for k, v in request.headers.items()],
        },
        headers={
            "X-Usage-Tokens": "120",
            "Connection": "close, X-Private",
            "X-Private": "hop",
            "Keep-Alive": "timeout=5",
            "X-Kept": "yes",
        },
    )


async def slow(request: Request) -> Response:
    import asyncio

    await asyncio.sleep(3)
    return Response("late")


async def stream(request: Request) -> Response:
    import asyncio

    async def chunks() -> Any:
        for i in range(50):
            yield f"chunk {i}\n".encode()
            await asyncio.sleep(0.02)

    return StreamingResponse(chunks(), headers={"X-Usage-Tokens": "77"})


UPSTREAM = Starlette(
    routes=[
        Route("/slow", slow),
        Route("/stream", stream),
        Route("/{path:path}", echo, methods=["GET", "POST", "PUT"]),
    ]
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """The upstream app, served by uvicorn for the whole module."""
    with serve_asgi(UPSTREAM) as url:
        yield url


def gateway_config(upstream: str, **proxy: Any) -> dict[str, Any]:
    """A gateway with one metered route and a response-priced one, in front of `upstream`."""
    return {
        "metrics": {**counters("calls", "tokens"), "in_flight": metric("UpDownCounter")},
        "plans": {
            "p": plan(
                calls=asset(tier(0), tier(100, "OverUsage", "Deny"), period="month"),
                tokens=asset(tier(0, per_unit=1), period="month", balance="credits"),
                in_flight=asset(tier(0), tier(5, "OverUsage", "Deny")),
            )
        },
        "customers": {"c": customer("p", credits=10_000, api_keys=[KEY])},
        "routes": [
            route(
                "/stream",
                {"metric": "tokens", "cost": {"response_header": "X-Usage-Tokens", "reserve": 500}},
                "in_flight",
            ),
            route(
                "/chat",
                {"metric": "tokens", "cost": {"response_header": "X-Usage-Tokens", "reserve": 500}},
            ),
            route("/open"),
            route("/{rest:path}", "calls"),
        ],
        # Below /slow's 3 s, with room for a busy machine's upstream to answer the others.
        "proxy": {"upstream": upstream, "timeout_s": 2, "max_body_bytes": 1000, **proxy},
    }


@pytest.fixture
def gateway(storage_url: str, clock: Clock, upstream: str) -> Iterator[tuple[str, Meter]]:
    """The metered proxy served by uvicorn, and a Meter over the same storage."""
    config = with_storage(gateway_config(upstream, trusted_proxies=["10.0.0.0/8"]), storage_url)
    with serve_asgi(create_app(config, clock=clock)) as url:
        meter = Meter(config, clock=clock)
        yield url, meter
        meter.close()


def auth(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}", **extra}


def seen_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.json()["headers"]}


def test_forwards_method_path_query_and_body(gateway: tuple[str, Meter]) -> None:
    """The upstream receives the method, path, query and body, and the customer's key never."""
    url, meter = gateway
    r = httpx.post(f"{url}/v1/things?a=1&b=2", headers=auth(), content=b"x" * 300)
    assert r.status_code == 200
    body = r.json()
    assert (body["path"], body["query"], body["length"]) == ("/v1/things", "a=1&b=2", 300)
    assert "authorization" not in seen_headers(r)
    assert meter.usage("c", "calls")["value"] == 1


def test_hop_by_hop_fields_are_stripped_both_ways(gateway: tuple[str, Meter]) -> None:
    """Connection, Keep-Alive, TE, Upgrade and every field named in Connection never cross."""
    url, _ = gateway
    r = httpx.get(
        f"{url}/v1/x",
        headers=auth(
            **{
                "Connection": "keep-alive, X-Secret",
                "X-Secret": "s",
                "TE": "trailers",
                "Proxy-Authorization": "Basic abc",
                "X-End": "e",
            }
        ),
    )
    upstream_saw = seen_headers(r)
    for field in ("x-secret", "te", "proxy-authorization"):
        assert field not in upstream_saw
    assert upstream_saw["x-end"] == "e"
    assert "x-private" not in r.headers and "keep-alive" not in r.headers
    assert r.headers["x-kept"] == "yes"


def test_forwarded_headers_are_replaced_from_untrusted_peers(gateway: tuple[str, Meter]) -> None:
    """From an untrusted peer, X-Forwarded-For is replaced by the peer and Forwarded dropped."""
    url, _ = gateway
    r = httpx.get(
        f"{url}/v1/x",
        headers=auth(
            **{
                "X-Forwarded-For": "6.6.6.6",
                "X-Forwarded-Proto": "https",
                "Forwarded": "for=6.6.6.6",
            }
        ),
    )
    upstream_saw = seen_headers(r)
    assert upstream_saw["x-forwarded-for"] == "127.0.0.1"
    assert upstream_saw["x-forwarded-proto"] == "http"
    assert "forwarded" not in upstream_saw
    assert upstream_saw["x-forwarded-host"].startswith("127.0.0.1:")


def test_forwarded_headers_are_extended_from_trusted_peers(
    storage_url: str, clock: Clock, upstream: str
) -> None:
    """From a trusted proxy, X-Forwarded-For is kept and the peer appended."""
    config = with_storage(gateway_config(upstream, trusted_proxies=["127.0.0.1/32"]), storage_url)
    with serve_asgi(create_app(config, clock=clock)) as url:
        r = httpx.get(f"{url}/v1/x", headers=auth(**{"X-Forwarded-For": "203.0.113.9"}))
    assert seen_headers(r)["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"


# An encoded slash (`/%2F%2Fevil.example/x`) is refused with 400: tests/security/test_paths.py.
@pytest.mark.parametrize("path", ["//evil.example/x", "/http://evil.example/x"])
def test_no_path_changes_the_upstream_origin(gateway: tuple[str, Meter], path: str) -> None:
    """Paths that look like authorities or URLs still go to the configured upstream."""
    url, _ = gateway
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["raw_path"].startswith("/")


def test_body_over_the_limit_is_413(gateway: tuple[str, Meter]) -> None:
    """A declared body over max_body_bytes is refused with 413 problem+json."""
    url, _ = gateway
    r = httpx.post(f"{url}/v1/x", headers=auth(), content=b"x" * 1001)
    assert r.status_code == 413
    assert r.json()["type"] == "urn:metergate:problem:body-too-large"


def test_streamed_body_over_the_limit_is_413(gateway: tuple[str, Meter]) -> None:
    """A chunked body is counted while it streams and refused with 413 once past the limit."""
    url, _ = gateway

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"y" * 100

    r = httpx.post(f"{url}/v1/x", headers=auth(), content=chunks())
    assert r.status_code == 413


def test_slow_upstream_is_504(gateway: tuple[str, Meter]) -> None:
    """An upstream slower than proxy.timeout_s is answered with 504 problem+json."""
    url, _ = gateway
    r = httpx.get(f"{url}/slow", headers=auth(), timeout=10)
    assert r.status_code == 504
    assert r.json()["type"] == "urn:metergate:problem:gateway-timeout"


def test_unreachable_upstream_is_502(storage_url: str, clock: Clock) -> None:
    """An upstream nobody listens on is answered with 502 problem+json."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = with_storage(gateway_config(f"http://127.0.0.1:{port}"), storage_url)
    with serve_asgi(create_app(config, clock=clock)) as url:
        r = httpx.get(f"{url}/v1/x", headers=auth())
    assert r.status_code == 502
    assert r.json()["type"] == "urn:metergate:problem:bad-gateway"


def test_response_priced_usage_is_settled_through_the_proxy(gateway: tuple[str, Meter]) -> None:
    """The upstream's X-Usage-Tokens is recorded and charged; the hold is released."""
    url, meter = gateway
    r = httpx.post(f"{url}/chat", headers=auth(), content=b"{}")
    assert r.status_code == 200
    # Settled once the last byte has gone out: the client may read the response first.
    deadline = time.monotonic() + 10
    while meter.usage("c", "tokens")["value"] != 120 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert meter.usage("c", "tokens")["value"] == 120
    balance = meter.balance("c", "credits")
    assert (balance.amount, balance.held) == (10_000 - 120, 0)


def test_client_gone_mid_stream_settles_and_frees_the_lease(gateway: tuple[str, Meter]) -> None:
    """A client leaving mid-stream still settles the tokens hold and ends the in-flight lease."""
    url, meter = gateway
    with httpx.stream("GET", f"{url}/stream", headers=auth()) as r:
        assert r.status_code == 200
        for _ in r.iter_bytes(8):
            break
    deadline = time.monotonic() + 10
    while meter.usage("c", "in_flight")["value"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert meter.usage("c", "in_flight")["value"] == 0
    assert meter.balance("c", "credits").held == 0


def test_unmetered_route_needs_no_key(gateway: tuple[str, Meter]) -> None:
    """A route with `meter: []` is forwarded without a key and without metering."""
    url, _ = gateway
    assert httpx.get(f"{url}/open").status_code == 200


def test_missing_key_is_401_and_never_forwarded(gateway: tuple[str, Meter]) -> None:
    """Without a key the proxy answers 401 problem+json itself."""
    url, _ = gateway
    r = httpx.get(f"{url}/v1/x")
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"


def test_concurrent_requests_through_the_proxy_are_all_counted(gateway: tuple[str, Meter]) -> None:
    """Forty concurrent proxied requests are each counted once."""
    url, meter = gateway
    results: list[int] = []

    def hit() -> None:
        results.append(httpx.get(f"{url}/v1/x", headers=auth()).status_code)

    threads = [threading.Thread(target=hit) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(200) == 40
    assert meter.usage("c", "calls")["value"] == 40
