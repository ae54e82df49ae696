"""CPU per request of the ASGI metering path in-process, against the floors below it.

    python benchmarks/inproc.py

No HTTP server and no wrk: the apps are called directly by 64 concurrent tasks on one event loop,
with the real pipelined connection to a private redis-server, and the process's CPU time is divided
by the requests. CPU time, unlike throughput, barely moves when other processes load the machine.

The steps, each measured in every round:
- bare Starlette: the app alone.
- pass-through middleware: an ASGI wrapper that does nothing (the cost of one more layer).
- one round trip: a middleware that sends one PING on metergate's pipelined connection per request
  and waits for it (the floor of any middleware that asks Redis something per request).
- MeteringMiddleware: the real thing (API key, route, one admission script, RateLimit fields).
- with allowances: the same with `allowances.enabled`: most requests admitted in process.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import scenario
import storage_bench
from harness import RedisServer, cpu_seconds

CONCURRENCY = 64

SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": scenario.PATH,
    "raw_path": scenario.PATH.encode(),
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"bench"), (b"authorization", f"Bearer {scenario.API_KEY}".encode())],
    "client": ("127.0.0.1", 40000),
    "server": ("127.0.0.1", 80),
}


async def _drive(app: Any, requests: int) -> tuple[float, dict[int, int]]:
    """Send `requests` requests through `app` from CONCURRENCY tasks; return CPU s and non-200s."""
    failures: dict[int, int] = {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def worker(n: int) -> None:
        nonlocal failures
        for _ in range(n):
            status = 0

            async def send(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]

            await app(dict(SCOPE), receive, send)
            if status != 200:
                failures[status] = failures.get(status, 0) + 1

    share = [requests // CONCURRENCY] * CONCURRENCY
    await asyncio.gather(*(worker(n) for n in share[:4]))  # warm: connect, load script, cache
    start = time.process_time()
    await asyncio.gather(*(worker(n) for n in share))
    return time.process_time() - start, failures


class _PassThrough:
    """A middleware that does nothing: the cost of one more ASGI layer."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


STEPS = [
    "bare Starlette",
    "pass-through middleware",
    "one round trip",
    "MeteringMiddleware",
    "  with allowances",
]


def _app(label: str, url: str) -> Any:
    import apps

    if label == "bare Starlette":
        return apps.starlette_bare()
    if label == "pass-through middleware":
        return _PassThrough(apps.starlette_bare())
    if label == "one round trip":
        return apps.OneRoundTrip(apps.starlette_bare(), url)
    if label == "  with allowances":
        return apps.starlette_allowances()
    return apps.starlette_metered()


def measure(redis_url: str, redis_pid: int, *, requests: int, rounds: int) -> dict[str, Any]:
    """CPU us per request of each step, interleaved over rounds."""
    os.environ["MG_BENCH_REDIS"] = redis_url
    config = scenario.gateway_config(redis_url)
    client = __import__("redis").Redis.from_url(redis_url, decode_responses=True)
    refused: dict[str, int] = {}
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in STEPS}
    for r in range(rounds):
        for label in STEPS[r % len(STEPS) :] + STEPS[: r % len(STEPS)]:
            storage_bench.reseed(client, config)
            app = _app(label, redis_url)

            async def run(app: Any = app) -> tuple[float, float, dict[int, int]]:
                r0 = cpu_seconds(redis_pid)
                cpu, failures = await _drive(app, requests)
                redis_cpu = cpu_seconds(redis_pid) - r0
                closer = getattr(getattr(app, "meter", app), "aclose", None)
                if closer is not None:
                    await closer()
                return cpu, redis_cpu, failures

            cpu, redis_cpu, failures = asyncio.run(run())
            if sum(failures.values()) > requests // 100:
                raise RuntimeError(f"{label}: answers other than 200: {failures}")
            for status, count in failures.items():  # e.g. 503 after a storage timeout
                refused[f"{label}: {status}"] = refused.get(f"{label}: {status}", 0) + count
            samples[label].append((cpu / requests * 1e6, redis_cpu / requests * 1e6))
    client.close()
    rows = []
    base = None
    for label in STEPS:
        cpu = statistics.median(s[0] for s in samples[label])
        redis_cpu = statistics.median(s[1] for s in samples[label])
        base = cpu if base is None else base
        rows.append(
            {
                "step": label,
                "cpu_us_per_request": round(cpu, 1),
                "added_cpu_us": round(cpu - base, 1),
                "redis_cpu_us_per_request": round(redis_cpu, 1),
                "samples": [round(s[0], 1) for s in samples[label]],
            }
        )
    return {"requests": requests, "rounds": rounds, "rows": rows, "not_200": refused}


def main() -> None:
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory(prefix="mg-inproc-") as tmp:
        redis = RedisServer(Path(tmp))
        redis.start()
        try:
            requests = 1280 if quick else 3840
            result = measure(redis.url, redis.pid, requests=requests, rounds=3)
        finally:
            redis.stop()
    print(f"{'step':24} {'CPU us/req':>11} {'added':>8} {'Redis CPU us/req':>17}")
    for row in result["rows"]:
        print(
            f"{row['step']:24} {row['cpu_us_per_request']:11.1f} {row['added_cpu_us']:8.1f}"
            f" {row['redis_cpu_us_per_request']:17.1f}"
        )


if __name__ == "__main__":
    main()
