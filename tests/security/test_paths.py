"""Paths: routes match the normalized path and the proxy forwards it; the rest is 400."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.security.conftest import (
    KEY,
    Gateway,
    Seen,
    balance,
    config,
    raw_exchange,
    serve,
    upstream,
)

from metergate import Meter, WSGIMeteringMiddleware
from metergate.core.paths import BadPath, normalize, normalize_decoded

SEGMENTS = st.lists(
    st.sampled_from(["a", "b", "v1", ".", "..", "", "%2e", "%2E%2e", "%61", "%7e", "%C3%A9", "~"]),
    max_size=8,
)


def reference(segments: list[str]) -> str | None:
    """RFC 3986 5.2.4 on `/`-joined segments after decoding unreserved escapes (None: above root)."""
    decoded = [
        s.replace("%2e", ".").replace("%2E", ".").replace("%61", "a").replace("%7e", "~")
        for s in segments
    ]
    merged = [s for i, s in enumerate(decoded) if s or i == len(decoded) - 1]
    out: list[str] = []
    for s in merged:
        if s == ".":
            continue
        if s == "..":
            if not out:
                return None
            out.pop()
            continue
        out.append(s)
    if merged and merged[-1] in (".", ".."):
        out.append("")
    return "/" + "/".join(out)


@given(SEGMENTS)
def test_normalization_follows_rfc_3986(segments: list[str]) -> None:
    """Dot segments go, slashes merge, unreserved escapes decode; climbing above `/` is refused."""
    raw = "/" + "/".join(segments)
    expected = reference(segments)
    if expected is None:
        with pytest.raises(BadPath):
            normalize(raw)
        return
    assert normalize(raw).raw == expected


@given(st.text(alphabet="/.%2fFeEaA5cC0~-_:@", max_size=20))
def test_normalization_is_idempotent_and_leaves_no_ambiguity(tail: str) -> None:
    """A normalized path normalizes to itself and holds no `//`, dot segment or encoded slash."""
    try:
        once = normalize("/" + tail)
    except BadPath:
        return
    assert normalize(once.raw) == once
    assert once.raw.startswith("/")
    assert "//" not in once.raw
    segments = once.raw.split("/")
    assert "." not in segments and ".." not in segments
    assert "%2F" not in once.raw.upper() and "%5C" not in once.raw.upper()
    assert normalize_decoded(once.path) == once.path


@pytest.fixture(scope="module")
def recorded() -> Iterator[tuple[str, Seen]]:
    """One recording upstream for the module."""
    with upstream() as found:
        yield found


@pytest.fixture(scope="module")
def gateway(
    recorded: tuple[str, Seen], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """`metergate serve` with `unmatched: pass`: a path that misses the route goes unmetered."""
    with serve(config(recorded[0], "memory://"), tmp_path_factory.mktemp("paths")) as gw:
        yield gw


def request(gateway: Gateway, path: str) -> tuple[int, bytes]:
    """Send a GET with the path exactly as written; return the status and body."""
    # HTTP/1.0: the answer comes whole, not chunked, and the connection closes after it.
    data = f"GET {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    answer, _ = raw_exchange(gateway.port, data)
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    "path",
    [
        "/x/../v1/hello",
        "/./v1/hello",
        "//v1/hello",
        "/v1//hello",
        "/v1/./hello",
        "/v1/%68ello",
        "/%761/hello",
        "/v1/hello/x/..",
        "/v1/x/%2e%2e/hello",
    ],
)
def test_path_variants_are_metered_and_forwarded_normalized(
    gateway: Gateway, recorded: tuple[str, Seen], path: str
) -> None:
    """Every spelling of `/v1/hello` is charged, and the upstream sees `/v1/hello`."""
    before = balance(gateway, "acme")
    status, body = request(gateway, path)
    assert status == 200
    assert balance(gateway, "acme") == before - 1
    forwarded = json.loads(body)["raw_path"]
    assert forwarded in ("/v1/hello", "/v1/hello/")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/a%2Fb",
        "/v1/a%2fb",
        "/v1/a%5Cb",
        "/v1/a%5cb",
        "/v1/a\\b",
        "/v1/a%00b",
        "/../v1/hello",
        "/v1/../../v1/hello",
        "/v1/%",
        "/v1/%zz",
    ],
)
def test_paths_that_cannot_be_normalized_are_400(
    gateway: Gateway, recorded: tuple[str, Seen], path: str
) -> None:
    """Encoded slashes and backslashes, NUL, bad escapes and climbs above `/` never reach the
    upstream and charge nothing."""
    before_seen = len(recorded[1].requests)
    before = balance(gateway, "acme")
    status, body = request(gateway, path)
    assert status == 400
    assert json.loads(body)["type"] == "urn:metergate:problem:bad-request"
    assert len(recorded[1].requests) == before_seen
    assert balance(gateway, "acme") == before


def test_matching_is_case_sensitive(gateway: Gateway, recorded: tuple[str, Seen]) -> None:
    """`/V1/hello` is another path (RFC 3986): not the metered route, forwarded as written."""
    before = balance(gateway, "acme")
    status, body = request(gateway, "/V1/hello")
    assert status == 200
    assert json.loads(body)["raw_path"] == "/V1/hello"
    assert balance(gateway, "acme") == before


def test_the_path_of_an_unmetered_request_is_normalized_too(
    gateway: Gateway, recorded: tuple[str, Seen], tmp_path: Path
) -> None:
    """An unmatched request passes, with its path normalized like a metered one."""
    status, body = request(gateway, "/other/./x//y/../z")
    assert status == 200
    assert json.loads(body)["raw_path"] == "/other/x/z"


@pytest.mark.parametrize("path", ["/x/../v1/hello", "//v1/hello", "/v1/./hello"])
def test_the_wsgi_middleware_matches_the_normalized_path(path: str) -> None:
    """Under WSGI too, path variants of a metered route are charged."""
    cfg = config("http://127.0.0.1:9", f"memory://wsgi-{uuid.uuid4().hex}")
    reached: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        reached.append(environ["PATH_INFO"])
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"ok"]

    middleware = WSGIMeteringMiddleware(app, config=cfg)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "HTTP_AUTHORIZATION": f"Bearer {KEY}",
        "wsgi.input": io.BytesIO(b""),
    }
    statuses: list[str] = []
    body = b"".join(middleware(environ, lambda status, headers, *a: statuses.append(status)))
    assert statuses == ["200 OK"] and body == b"ok"
    with Meter(cfg) as meter:
        assert meter.balance("acme", "credits").amount == 999
    assert reached == [path]


@pytest.mark.parametrize("variant", ["/v1/./hello", "//v1/hello", "/x/../v1/hello"])
def test_an_idempotency_key_retried_on_a_path_variant_is_replayed_under_wsgi(
    storage_url: str, variant: str
) -> None:
    """Under WSGI as under ASGI, a retry spelling the same path differently is the same request:
    replayed and charged once, not refused as a conflicting use of its Idempotency-Key."""
    cfg = config("http://127.0.0.1:9", storage_url)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"ok"]

    middleware = WSGIMeteringMiddleware(app, config=cfg)
    statuses: list[str] = []
    for path in ("/v1/hello", variant):
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": path,
            "SCRIPT_NAME": "",
            "QUERY_STRING": "",
            "HTTP_AUTHORIZATION": f"Bearer {KEY}",
            "HTTP_IDEMPOTENCY_KEY": "retry-1",
            "wsgi.input": io.BytesIO(b""),
        }
        b"".join(middleware(environ, lambda status, headers, *a: statuses.append(status)))
    middleware.meter.close()
    assert statuses == ["200 OK", "200 OK"]
    with Meter(cfg) as meter:
        assert meter.balance("acme", "credits").amount == 999
