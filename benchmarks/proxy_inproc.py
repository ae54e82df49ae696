"""CPU per request of the reverse proxy's upstream exchange in-process, one upstream client each.

    python benchmarks/proxy_inproc.py            # interleaved rounds, a table
    python benchmarks/proxy_inproc.py --profile  # cProfile of the shipped ProxyApp, top functions

No metering and no wrk: the bare `ProxyApp` (and each candidate of `proxies.py`) is called directly
by 64 concurrent tasks on one uvloop event loop, forwarding to the bare Starlette app served by
uvicorn in its own process. The proxy process's CPU time is divided by the requests: this is what
the proxy itself spends per request, apart from the metering (see `inproc.py` for that part).
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import scenario
from harness import Server, free_port

CONCURRENCY = 64
HERE = Path(__file__).resolve().parent

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
    "headers": [
        (b"host", b"bench"),
        (b"user-agent", b"bench"),
        (b"accept", b"*/*"),
    ],
    "client": ("127.0.0.1", 40000),
    "server": ("127.0.0.1", 80),
}

CLIENTS = {
    "shipped ProxyApp": None,
    "aiohttp (candidate)": "AiohttpProxy",
    "httpx.AsyncClient tuned": "HttpxClientProxy",
    "httpcore pool": "HttpcoreProxy",
    "lean (benchmarks/leanhttp.py)": "LeanProxy",
}


def _app(label: str) -> Any:
    from metergate import parse_config
    from metergate.proxy import ProxyApp

    config = parse_config(
        scenario.gateway_config("memory://", upstream=os.environ["MG_BENCH_UPSTREAM"])
    )
    kind = CLIENTS[label]
    if kind is None:
        return ProxyApp(config)
    import proxies

    return getattr(proxies, kind)(config)


async def _drive(app: Any, requests: int) -> tuple[float, dict[int, int]]:
    failures: dict[int, int] = {}

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)  # only a disconnect could come; none does
        return {"type": "http.disconnect"}

    async def worker(n: int) -> None:
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
    await asyncio.gather(*(worker(2) for _ in range(CONCURRENCY)))  # warm: fill the pool
    start = time.process_time()
    await asyncio.gather(*(worker(n) for n in share))
    return time.process_time() - start, failures


async def _close(app: Any) -> None:
    for name in ("close", "aclose"):
        closer = getattr(app, name, None)
        if closer is not None:
            await closer()
            return
    session = getattr(app, "session", None)
    if session is not None:
        await session.close()


def measure(requests: int, rounds: int, labels: list[str]) -> dict[str, list[float]]:
    import uvloop

    samples: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            app = _app(label)

            async def run(app: Any = app) -> tuple[float, dict[int, int]]:
                try:
                    return await _drive(app, requests)
                finally:
                    await _close(app)

            cpu, failures = uvloop.run(run())
            if failures:
                raise RuntimeError(f"{label}: answers other than 200: {failures}")
            samples[label].append(cpu / requests * 1e6)
    return samples


def main() -> None:
    sys.path.insert(0, str(HERE))
    port = free_port()
    upstream = Server(
        "upstream",
        [
            *(sys.executable, "-m", "uvicorn", "--factory", "apps:starlette_bare"),
            *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
            *("--log-level", "warning", "--loop", "uvloop", "--http", "httptools"),
        ],
        port,
    )
    upstream.start()
    try:
        upstream.wait_ready()
        os.environ["MG_BENCH_UPSTREAM"] = upstream.url
        if "--profile" in sys.argv:
            import uvloop

            app = _app("shipped ProxyApp")
            profile = cProfile.Profile()

            async def run() -> None:
                profile.enable()
                await _drive(app, 3840)
                profile.disable()
                await _close(app)

            uvloop.run(run())
            stats = pstats.Stats(profile)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(40)
            return
        labels = [a for a in sys.argv[1:] if not a.startswith("--")] or list(CLIENTS)
        quick = "--quick" in sys.argv
        samples = measure(1280 if quick else 3840, 3 if quick else 5, labels)
    finally:
        upstream.stop()
    print(f"{'proxy client':32} {'CPU us/req':>11}  samples")
    for label, values in samples.items():
        median = statistics.median(values)
        print(f"{label:32} {median:11.1f}  {[round(v, 1) for v in values]}")


if __name__ == "__main__":
    main()
