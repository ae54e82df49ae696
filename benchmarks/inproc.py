"""CPU per request of the ASGI metering path in-process, and what candidate fixes would save.

    python benchmarks/inproc.py

No HTTP server and no wrk: the apps are called directly by 64 concurrent tasks on one event loop,
with the real pipelined connection to a private redis-server, and the process's CPU time is divided
by the requests. CPU time, unlike throughput, barely moves when other processes load the machine.

Each candidate fix is a monkeypatch of src/ inside this process only, measured alone and then all
together:
- wait_for: `asyncio.wait_for` (a Task per call on Python 3.11; two per admission) replaced by
  `asyncio.timeout`.
- pack: `pipelined._encode` replaced by hiredis.pack_command (same bytes, in C).
- op-ids: `uuid.uuid4()` (an os.urandom syscall) per admission replaced by a prefix + counter.
- coalesce: the pipelined connection buffers the commands of one loop iteration and writes them
  with one `transport.write` (one syscall for many admissions; Redis reads them in one go).
A patch that no longer fits src/ is reported as not applicable.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
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


def _patch_wait_for() -> Callable[[], None]:
    original = asyncio.wait_for

    async def wait_for(aw: Any, timeout: float | None) -> Any:
        async with asyncio.timeout(timeout):
            return await aw

    asyncio.wait_for = wait_for  # type: ignore[assignment]
    return lambda: setattr(asyncio, "wait_for", original)


def _patch_pack() -> Callable[[], None]:
    import hiredis

    from metergate.storage import pipelined

    original = pipelined._encode
    pipelined._encode = hiredis.pack_command  # type: ignore[assignment]
    return lambda: setattr(pipelined, "_encode", original)


def _patch_op_ids() -> Callable[[], None]:
    from metergate.core import flows

    original = flows.uuid
    prefix = os.urandom(6).hex()
    counter = itertools.count()
    flows.uuid = types.SimpleNamespace(  # type: ignore[assignment]
        uuid4=lambda: types.SimpleNamespace(hex=f"{prefix}{next(counter):020x}")
    )
    return lambda: setattr(flows, "uuid", original)


class _CoalescingWriter:
    """A transport whose writes within one loop iteration go out as one `write` (one syscall)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            asyncio.get_running_loop().call_soon(self._flush)
        else:
            self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(b"".join(pending))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _patch_coalesce() -> Callable[[], None]:
    from metergate.storage import pipelined

    cls = pipelined._Protocol
    original = cls.connection_made

    def connection_made(self: Any, transport: Any) -> None:
        original(self, transport)
        self.transport = _CoalescingWriter(self.transport)

    cls.connection_made = connection_made  # type: ignore[method-assign]
    return lambda: setattr(cls, "connection_made", original)


PATCHES = [
    ("wait_for", _patch_wait_for),
    ("pack", _patch_pack),
    ("op-ids", _patch_op_ids),
    ("coalesce", _patch_coalesce),
]


def measure(redis_url: str, redis_pid: int, *, requests: int, rounds: int) -> dict[str, Any]:
    """CPU us per request: bare app, metered as shipped, and with the fixes applied cumulatively."""
    import apps

    os.environ["MG_BENCH_REDIS"] = redis_url
    config = scenario.gateway_config(redis_url)
    client = __import__("redis").Redis.from_url(redis_url, decode_responses=True)
    steps: list[tuple[str, list[str]]] = [("bare Starlette", []), ("MeteringMiddleware", [])]
    steps += [(f"+ {name} only", [name]) for name, _ in PATCHES]
    steps.append(("+ all of them", [name for name, _ in PATCHES]))
    skipped: dict[str, str] = {}
    refused: dict[str, int] = {}
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in steps}
    for _ in range(rounds):
        for label, patches in steps:
            undo = []
            try:
                for name, patch in PATCHES:
                    if name in patches and name not in skipped:
                        try:
                            undo.append(patch())
                        except (AttributeError, KeyError, ImportError) as exc:
                            skipped[name] = f"{type(exc).__name__}: {exc}"
                storage_bench.reseed(client, config)
                app = (
                    apps.starlette_bare() if label == "bare Starlette" else apps.starlette_metered()
                )

                async def run(app: Any = app) -> tuple[float, float, int]:
                    r0 = cpu_seconds(redis_pid)
                    cpu, failures = await _drive(app, requests)
                    redis_cpu = cpu_seconds(redis_pid) - r0
                    meter = getattr(app, "meter", None)
                    if meter is not None:
                        await meter.aclose()
                    return cpu, redis_cpu, failures

                cpu, redis_cpu, failures = asyncio.run(run())
                if sum(failures.values()) > requests // 100:
                    raise RuntimeError(f"{label}: answers other than 200: {failures}")
                for status, count in failures.items():  # e.g. 503 after a storage timeout
                    refused[f"{label}: {status}"] = refused.get(f"{label}: {status}", 0) + count
                samples[label].append((cpu / requests * 1e6, redis_cpu / requests * 1e6))
            finally:
                for u in reversed(undo):
                    u()
    client.close()
    rows = []
    base = shipped = None
    for label, _ in steps:
        cpu = statistics.median(s[0] for s in samples[label])
        redis_cpu = statistics.median(s[1] for s in samples[label])
        base = cpu if base is None else base
        shipped = cpu if label == "MeteringMiddleware" else shipped
        rows.append(
            {
                "step": label,
                "cpu_us_per_request": round(cpu, 1),
                "added_cpu_us": round(cpu - base, 1),
                "saved_us": round(shipped - cpu, 1) if shipped and label.startswith("+") else None,
                "redis_cpu_us_per_request": round(redis_cpu, 1),
                "samples": [round(s[0], 1) for s in samples[label]],
            }
        )
    return {
        "requests": requests,
        "rounds": rounds,
        "rows": rows,
        "not_applicable": skipped,
        "not_200": refused,
    }


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
    print(f"{'step':24} {'CPU us/req':>11} {'added':>8} {'saved':>8} {'Redis CPU us/req':>17}")
    for row in result["rows"]:
        saved = "" if row["saved_us"] is None else f"{row['saved_us']:8.1f}"
        print(
            f"{row['step']:24} {row['cpu_us_per_request']:11.1f} {row['added_cpu_us']:8.1f}"
            f" {saved:>8} {row['redis_cpu_us_per_request']:17.1f}"
        )
    for name, why in result["not_applicable"].items():
        print(f"not applicable: {name} ({why})")


if __name__ == "__main__":
    main()
