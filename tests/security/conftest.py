"""The security suite's world: `metergate serve` as a real process, a recording upstream, raw sockets.

Every attack runs against what users run: the `metergate serve` command in its own process, in
front of a real upstream that records what reached it. Raw sockets send what HTTP clients would
clean up (dot segments, ambiguous framing, dripping headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tests.adapters.harness import serve_asgi
from tests.builders import asset, counters, customer, gateway, plan, route, tier

from conftest import free_port, serve_process

TOKEN = "security-admin-token-0123"
KEY = "key-of-acme"
OTHER_KEY = "key-of-other"
START_S = 30.0


@dataclass
class Seen:
    """What the upstream received: one entry per request (method, raw path, headers, body)."""

    requests: list[dict[str, Any]] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [r["raw_path"] for r in self.requests]


class Upstream:
    """An ASGI upstream that records every request, reads bodies as they come, answers JSON."""

    def __init__(self) -> None:
        self.seen = Seen()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        record = {
            "method": scope["method"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "headers": {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]},
            "body": len(body),
        }
        self.seen.requests.append(record)
        data = json.dumps(record).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": data})
        await asyncio.sleep(0)


def config(upstream: str, storage_url: str, **extra: Any) -> dict[str, Any]:
    """Two customers on a metered plan with a balance, one metered route, unmetered passes."""
    out = gateway(
        storage_url=storage_url,
        storage={"timeout_ms": 2000},
        metrics=counters("calls"),
        plans={"p": plan(calls=asset(tier(0, per_unit=1), period="month", balance="credits"))},
        customers={
            "acme": customer("p", credits=1000, api_keys=[KEY]),
            "other": customer("p", credits=1000, api_keys=[OTHER_KEY]),
        },
        routes=[route("/v1/{rest:path}", "calls")],
        unmatched="pass",
        proxy={"upstream": upstream, "timeout_s": 5},
        admin={"token": TOKEN},
    )
    for key, value in extra.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) else value
    return out


@dataclass
class Gateway:
    """A running `metergate serve`: its proxy and admin URLs."""

    proxy: str
    admin: str
    proc: subprocess.Popen[bytes]

    @property
    def port(self) -> int:
        return int(self.proxy.rsplit(":", 1)[1])

    def get(self, path: str, key: str = KEY, **kwargs: Any) -> httpx.Response:
        """GET through the proxy with a customer's key."""
        headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
        return httpx.get(self.proxy + path, headers=headers, timeout=10, **kwargs)

    def admin_call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Call the admin API with the admin token."""
        headers = {"Authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})}
        return httpx.request(method, self.admin + path, headers=headers, timeout=10, **kwargs)


@contextlib.contextmanager
def serve(cfg: dict[str, Any], tmp_path: Path) -> Iterator[Gateway]:
    """Run `metergate serve --no-worker` with `cfg` in a subprocess until the block ends."""
    path = tmp_path / f"gateway-{free_port()}.json"
    path.write_text(json.dumps(cfg))
    with serve_process(path, "--no-worker", start_s=START_S) as served:
        yield Gateway(served.proxy, served.admin, served.proc)


@contextlib.contextmanager
def upstream() -> Iterator[tuple[str, Seen]]:
    """A recording upstream served by uvicorn in a thread; yields its URL and what it saw."""
    app = Upstream()
    with serve_asgi(app) as url:
        yield url, app.seen


def raw_exchange(port: int, data: bytes, timeout_s: float = 10.0) -> tuple[bytes, bool]:
    """Send raw bytes; return everything answered and whether the server closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            return answer, False
    return answer, True


def balance(gateway: Gateway, customer: str, name: str = "credits") -> int:
    """A balance's amount, read through the admin API."""
    r = gateway.admin_call("GET", f"/v1/customers/{customer}/balances/{name}")
    assert r.status_code == 200, r.text
    return int(r.json()["amount"])
