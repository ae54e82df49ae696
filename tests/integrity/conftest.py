"""Fixtures of the integrity suite: `metergate serve` as a real process over a real Redis, in
front of an upstream that counts what reaches it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.adapters.harness import serve_asgi
from tests.builders import asset, counters, customer, gateway, plan, route, tier

from conftest import RedisProcess, serve_process
from metergate.config import hash_api_key

TOKEN = "integrity-admin-token-0123"
ALLOWANCES = os.environ.get("METERGATE_TEST_ALLOWANCES") == "1"
"""Run the suite with local allowances on (the config's default is off)."""
PRICE = 1


def key_of(customer: str) -> str:
    """The API key of a customer of `gateway_config`."""
    return f"key-of-{customer}"


def auth(customer: str = "c") -> dict[str, str]:
    """The Authorization header of a customer."""
    return {"authorization": f"Bearer {key_of(customer)}"}


@dataclass
class Upstream:
    """An ASGI upstream counting the requests that reach it, by path."""

    hits: list[str] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        path = scope["path"]
        self.hits.append(path)
        status = 200
        if path.startswith("/v1/fail") or path.startswith("/v1/free-fail"):
            status = 500
        elif path.startswith("/v1/missing"):
            status = 404
        elif path.startswith("/v1/slow"):
            await asyncio.sleep(float(dict(scope["headers"]).get(b"x-sleep", b"3")))
        out = json.dumps({"path": path, "body": len(body), "n": len(self.hits)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": out})


def gateway_config(
    upstream: str, redis_url: str, customers: dict[str, int], **storage: Any
) -> dict[str, Any]:
    """One priced metric (`calls`, PRICE credit each) on routes with various refund rules."""
    return gateway(
        storage_url=redis_url,
        storage={"timeout_ms": 1000, **storage},
        metrics=counters("calls"),
        plans={"p": plan(calls=asset(tier(0, per_unit=PRICE), period="month", balance="credits"))},
        customers={
            name: customer("p", credits=amount, api_keys=[hash_api_key(key_of(name))])
            for name, amount in customers.items()
        },
        routes=[
            route("/v1/free-fail", "calls", refund_on=[]),
            route("/v1/missing/{x}", "calls", refund_on=["4xx"]),
            route("/v1/{rest:path}", "calls"),
        ],
        proxy={"upstream": upstream, "timeout_s": 1, "max_body_bytes": 1000},
        admin={"token": TOKEN},
        allowances={"enabled": ALLOWANCES},
    )


@dataclass
class Served:
    """A running `metergate serve`: its proxy and admin URLs and its process."""

    proxy: str
    admin: str
    proc: subprocess.Popen[bytes]
    log: Path

    def metrics(self) -> str:
        """The Prometheus text of the admin port."""
        return httpx.get(
            f"{self.admin}/metrics", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10
        ).text

    def unknown(self) -> int:
        """The value of metergate_admissions_unknown_total."""
        for line in self.metrics().splitlines():
            if line.startswith("metergate_admissions_unknown_total"):
                return int(float(line.split()[-1]))
        return 0


@contextmanager
def serve(tmp_path: Path, config: dict[str, Any]) -> Iterator[Served]:
    """Run `metergate serve` with `config` in a subprocess until the block ends."""
    path = tmp_path / f"gateway-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(config))
    with serve_process(path) as served:
        yield Served(served.proxy, served.admin, served.proc, served.log)


@pytest.fixture
def upstream() -> Iterator[tuple[str, Upstream]]:
    """The counting upstream on a free port."""
    app = Upstream()
    with serve_asgi(app) as url:
        yield url, app


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone that keeps its data across a kill and restart (AOF)."""
    server = RedisProcess(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "no")
    server.start()
    yield server
    server.stop()


@contextmanager
def paused(server: RedisProcess) -> Iterator[None]:
    """SIGSTOP the server for the block; SIGCONT it whatever happens."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def admin(served: Served, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """Call the admin API of a running gateway."""
    headers = {"authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})}
    return httpx.request(method, f"{served.admin}{path}", headers=headers, timeout=10, **kwargs)


def books(served: Served, customer: str) -> tuple[int, int, int, int]:
    """Return (calls value, balance amount, held, sum of the ledger's deltas) of a customer."""
    usage = admin(served, "GET", f"/v1/customers/{customer}/usage").json()
    assert "metrics" in usage, (usage, served.log.read_text()[-3000:])
    balance = admin(served, "GET", f"/v1/customers/{customer}/balances/credits").json()
    ledger = admin(served, "GET", f"/v1/customers/{customer}/ledger?limit=10000").json()
    total = sum(e["delta"] for e in ledger["entries"])
    return usage["metrics"]["calls"]["value"], balance["amount"], balance["held"], total
