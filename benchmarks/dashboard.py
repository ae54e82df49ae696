"""Dashboard benchmark: server time of one customer's page with 10,000 ledger lines.

    python benchmarks/dashboard.py [--lines 10000] [--rounds 30]

Fills a customer's ledger on the embedded backend and on a private redis-server, then times the
customer page (first ledger page, a page deep in the ledger) and the customers list, in process
(the ASGI app called through httpx's ASGITransport: server time, no sockets). It also reports
the bytes one asset's usage history takes in Redis (`MEMORY USAGE`) after a day and after 62 days.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from harness import RedisServer

from metergate import Meter
from metergate.admin import admin_app
from metergate.core.flows import Command
from metergate.core.history import history_keys

TOKEN = "benchmark-admin-token-0123456789"
CONFIG: dict[str, Any] = {
    "metrics": {"calls": {"type": "CumulativeCounter"}},
    "plans": {
        "pro": {
            "assets": {
                "calls": {
                    "period": "month",
                    "balance": "credits",
                    "tiers": [
                        {"from": 0, "level": "Normal", "policy": "NotifyOnly"},
                        {"from": 1000, "level": "Warning", "policy": "NotifyOnly"},
                        {"from": 5000, "level": "OverUsage", "policy": "Deny"},
                    ],
                }
            }
        }
    },
    "customers": {
        "acme": {"entitlement": {"plan": "pro"}, "balances": {"credits": {"amount": 10**9}}}
    },
    "admin": {"token": TOKEN},
}


def fill(config: dict[str, Any], lines: int) -> None:
    """Give acme `lines` ledger lines (top-ups) and some usage."""
    with Meter(config) as meter:
        for _ in range(lines):
            meter.topup("acme", "credits", 1)
        for _ in range(50):
            meter.record("acme", "calls", 3)


async def timings(config: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median milliseconds per page, in process."""
    app = admin_app(config)
    out: dict[str, float] = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            form = await client.get("/ui/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert csrf is not None
            signed = await client.post("/ui/login", data={"csrf": csrf.group(1), "token": TOKEN})
            assert signed.status_code == 303
            for name, path in (
                ("customer page, first ledger page", "/ui/customers/acme"),
                ("customer page, ledger page 150", "/ui/customers/acme?page=150"),
                ("customers list", "/ui/"),
                ("events", "/ui/events"),
            ):
                samples = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    response = await client.get(path)
                    samples.append((time.perf_counter() - start) * 1000)
                    assert response.status_code == 200, response.status_code
                out[name] = statistics.median(samples)
    return out


def history_bytes(config: dict[str, Any]) -> dict[str, int]:
    """MEMORY USAGE of one asset's two history hashes after one day and after 62 days of usage."""
    from metergate.core.keys import Keys
    from metergate.meter import as_config
    from metergate.storage import open_sync

    hourly, daily = history_keys(Keys(), "acme", "calls")
    storage = open_sync(as_config(config).storage)
    client = storage.run
    out = {}
    day = int(time.time() // 86_400)
    for days in (1, 62):
        client(Command(("DEL", hourly, daily)))
        for d in range(days):
            for h in range(24):
                client(Command(("HINCRBY", daily, str(day - days + d), "1234")))
                if d >= days - 2:
                    client(Command(("HINCRBY", hourly, str((day - days + d) * 24 + h), "52")))
        client(Command(("HSET", hourly, "lo", "0")))
        client(Command(("HSET", daily, "lo", "0")))
        size = sum(int(client(Command(("MEMORY", "USAGE", k))) or 0) for k in (hourly, daily))
        out[f"after {days} day(s)"] = size
    storage.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = RedisServer(Path(tmp))
        redis_server.start()
        try:
            for backend, url in (
                ("embedded", f"memory://dashboard-bench-{time.time_ns()}"),
                ("redis", redis_server.url),
            ):
                config = {**CONFIG, "storage": {"url": url, "timeout_ms": 2000}}
                fill(config, args.lines)
                for name, ms in asyncio.run(timings(config, args.rounds)).items():
                    print(f"{backend:9} {name:36} {ms:7.1f} ms (median of {args.rounds})")
                if backend == "redis":
                    for name, size in history_bytes(config).items():
                        print(f"{backend:9} usage history of one asset {name:14} {size:7} bytes")
        finally:
            redis_server.stop()


if __name__ == "__main__":
    main()
