"""Client-address and original-URL headers are believed only from trusted proxies."""

from __future__ import annotations

import json
from pathlib import Path

from tests.security.conftest import KEY, config, raw_exchange, serve, upstream

SPOOFED = {
    "Forwarded": "for=198.51.100.7;proto=https",
    "X-Real-IP": "198.51.100.7",
    "True-Client-IP": "198.51.100.7",
    "X-Client-IP": "198.51.100.7",
    "X-Forwarded-Port": "8443",
    "X-Forwarded-Prefix": "/admin",
    "X-Forwarded-Server": "internal.example",
    "X-Original-URL": "/admin/delete",
    "X-Rewrite-URL": "/admin/delete",
    "X-Forwarded-For": "198.51.100.7",
    "X-Forwarded-Host": "internal.example",
    "X-Forwarded-Proto": "https",
}


def send(port: int, path: str) -> dict[str, str]:
    """Send a request carrying every spoofable header; return the headers the upstream saw."""
    lines = "".join(f"{k}: {v}\r\n" for k, v in SPOOFED.items())
    data = f"GET {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n{lines}\r\n"
    answer, _ = raw_exchange(port, data.encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    seen: dict[str, str] = json.loads(body)["headers"]
    return seen


def test_spoofable_headers_from_an_untrusted_peer_never_reach_the_upstream(tmp_path: Path) -> None:
    """From an untrusted peer, the section 7 list is dropped and X-Forwarded-* are replaced, on
    metered and unmetered paths alike."""
    with upstream() as (url, _), serve(config(url, "memory://"), tmp_path) as gw:
        for path in ("/v1/hello", "/unmetered"):
            seen = send(gw.port, path)
            for name in SPOOFED:
                if name.lower().startswith(
                    ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
                ):
                    continue
                assert name.lower() not in seen, name
            assert seen["x-forwarded-for"] == "127.0.0.1"
            assert seen["x-forwarded-proto"] == "http"
            assert seen["x-forwarded-host"] == "x"


def test_a_trusted_proxy_keeps_them(tmp_path: Path) -> None:
    """From a peer in `trusted_proxies` the same headers pass, and X-Forwarded-For is extended."""
    cfg = config("", "memory://", proxy={"trusted_proxies": ["127.0.0.0/8"]})
    with upstream() as (url, _):
        cfg["proxy"]["upstream"] = url
        with serve(cfg, tmp_path) as gw:
            seen = send(gw.port, "/v1/hello")
    assert seen["x-real-ip"] == "198.51.100.7"
    assert seen["x-original-url"] == "/admin/delete"
    assert seen["x-forwarded-for"] == "198.51.100.7, 127.0.0.1"
