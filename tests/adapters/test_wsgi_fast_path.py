"""The WSGI middleware's per-request shortcuts answer exactly as the long way round."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from tests.builders import asset, counters, customer, gateway, plan, route, tier

from conftest import RedisProcess
from metergate import WSGIMeteringMiddleware
from metergate.wsgi import _Headers, _headers, _path

ENVIRON: dict[str, Any] = {
    "REQUEST_METHOD": "POST",
    "PATH_INFO": "/v1/x",
    "CONTENT_TYPE": "application/json",
    "CONTENT_LENGTH": "12",
    "HTTP_CONTENT_TYPE": "text/plain",  # a server passing both: CONTENT_TYPE wins
    "HTTP_AUTHORIZATION": "Bearer k",
    "HTTP_X_API_KEY": "key-1",
    "HTTP_IDEMPOTENCY_KEY": "order-7",
    "HTTP_X_TOKENS": "1200",
    "wsgi.url_scheme": "http",
    "SERVER_NAME": "test",
}


@pytest.mark.parametrize(
    "environ",
    [
        ENVIRON,
        {"HTTP_HOST": "h"},
        {"HTTP_CONTENT_LENGTH": "3", "HTTP_HOST": "h"},
        {},
    ],
)
def test_header_lookups_match_the_full_copy(environ: dict[str, Any]) -> None:
    """Every field name, present or not (with "_", in any case of the environ), reads the same
    from the lazy view as from a full copy of the fields."""
    full = _headers(environ)
    view = _Headers(environ)
    names = [
        *full,
        "authorization",
        "x-api-key",
        "idempotency-key",
        "x-tokens",
        "content-type",
        "content-length",
        "x_api_key",
        "missing",
        "",
    ]
    for name in names:
        assert view.get(name) == full.get(name), name
        assert view.get(name, "default") == full.get(name, "default"), name
        assert (name in view) == (name in full), name
        if name in full:
            assert view[name] == full[name]
        else:
            with pytest.raises(KeyError):
                view[name]
    assert dict(view) == full
    assert len(view) == len(full)


@pytest.mark.parametrize(
    ("script_name", "path_info"),
    [
        ("", "/v1/hello"),
        ("/api", "/v1/hello"),
        ("", ""),
        ("", "/caf\u00c3\u00a9"),  # UTF-8 bytes of "/café" as PEP 3333 hands them over
        ("", "/\u00e9"),  # latin-1 that is not UTF-8: kept as it came
    ],
)
def test_paths_decode_as_before(script_name: str, path_info: str) -> None:
    """ASCII paths skip the latin-1/UTF-8 round trip and come out as it would make them."""
    raw = script_name + path_info
    try:
        expected = raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        expected = raw
    assert _path({"SCRIPT_NAME": script_name, "PATH_INFO": path_info}) == (expected or "/")


class _Body:
    """A response body that counts how often it is closed."""

    def __init__(self) -> None:
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        yield b"hello"

    def close(self) -> None:
        self.closed += 1


def _config(url: str) -> dict[str, Any]:
    return gateway(
        storage_url=url,
        storage={"timeout_ms": 2000},
        metrics=counters("calls"),
        plans={"p": plan(calls=asset(tier(0, per_unit=1), period="month", balance="credits"))},
        customers={"c": customer("p", credits=100, api_keys=["key-of-c"])},
        routes=[route("/v1/{rest:path}", "calls", refund_on=[])],
    )


@pytest.mark.redis
def test_an_admission_with_nothing_to_settle_hands_back_the_apps_own_body(
    redis_server: RedisProcess,
) -> None:
    """A request priced up front on a route that refunds nothing needs nothing when its response
    ends: the app's body object is returned as it is (the server closes it), with the metering
    fields appended."""
    client = redis_server.client()
    client.flushall()
    client.close()
    body = _Body()
    seen: list[tuple[str, list[tuple[str, str]]]] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("content-type", "text/plain"), ("content-length", "5")])
        return body

    def start_response(status: str, headers: list[tuple[str, str]], *args: Any) -> None:
        seen.append((status, headers))

    middleware = WSGIMeteringMiddleware(app, _config(redis_server.url))
    try:
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/v1/hello",
            "HTTP_AUTHORIZATION": "Bearer key-of-c",
        }
        out = middleware(environ, start_response)
        assert out is body
        assert b"".join(out) == b"hello"
        close = getattr(out, "close", None)  # as a server closes it
        assert close is not None
        close()
        assert body.closed == 1
        status, headers = seen[0]
        assert status == "200 OK"
        assert headers[:2] == [("content-type", "text/plain"), ("content-length", "5")]
        assert dict(headers[2:])["metergate-balance"] == "99"
        assert middleware.meter.balance("c", "credits").amount == 99
    finally:
        middleware.meter.close()
