"""Concurrent requests through real servers never overshoot a limit, and leave nothing in flight."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import httpx
import pytest

from .conftest import Gateway
from .harness import ACME


def burst(url: str, path: str, n: int, headers: dict[str, str]) -> list[httpx.Response]:
    """Send `n` requests at once (one connection each) and return the responses."""

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            return list(
                await asyncio.gather(*(client.get(path, headers=headers) for _ in range(n)))
            )

    return asyncio.run(run())


def test_fifty_concurrent_requests_against_a_limit_of_ten(gateway: Gateway) -> None:
    """Of 50 concurrent requests against a Deny limit of 10, exactly 10 pass and 40 get 429."""
    responses = burst(gateway.url, "/v1/capped", 50, ACME)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 10 + [429] * 40
    assert len(gateway.seen.paths()) == 10
    assert gateway.meter.usage("acme", "capped")["value"] == 10
    remaining = sorted(
        int(r.headers["ratelimit"].rsplit("r=", 1)[1].split(";")[0]) for r in responses
    )
    assert remaining[:40] == [0] * 40 and remaining[40:] == list(range(10))


def test_concurrent_requests_never_exceed_the_concurrency_limit(gateway: Gateway) -> None:
    """Twenty slow concurrent requests on an UpDownCounter limit of 2 never run 3 at once."""
    responses = burst(gateway.url, "/v1/concurrent", 20, {**ACME, "x-delay-ms": "200"})
    passed = sum(r.status_code == 200 for r in responses)
    assert {r.status_code for r in responses} <= {200, 429}
    assert passed >= 2
    assert gateway.seen.most_active <= 2
    assert gateway.meter.usage("acme", "in_flight")["value"] == 0


def test_concurrent_priced_requests_never_overdraw(gateway: Gateway) -> None:
    """Thirty concurrent requests on 25 credits charge exactly 25 and refuse 5 with 402."""
    gateway.meter.withdraw("acme", "credits", 975)
    responses = burst(gateway.url, "/v1/anything", 30, ACME)
    assert sorted(r.status_code for r in responses) == [200] * 25 + [402] * 5
    assert gateway.meter.balance("acme", "credits").available == 0


# Run in a child process: a failing uvloop leaves handles behind that would spill into other tests.
ON_UVLOOP = """
import json, socket, sys, threading, time
import httpx, uvicorn
from metergate import MeteringMiddleware

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
sock.bind(("127.0.0.1", 0))
middleware = MeteringMiddleware(app, json.loads(sys.argv[1]))
server = uvicorn.Server(uvicorn.Config(middleware, loop="uvloop", log_level="critical"))
thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
thread.start()
while not server.started:
    time.sleep(0.01)
url = "http://127.0.0.1:%d/v1/capped" % sock.getsockname()[1]
with httpx.Client() as client:
    print([client.get(url, headers={"authorization": "Bearer acme-key"}).status_code
           for _ in range(12)])
server.should_exit = True
thread.join()
"""


@pytest.mark.parametrize("storage_url", ["memory", "redis"], indirect=True)
def test_asgi_middleware_on_uvloop(gateway_config: dict[str, Any]) -> None:
    """Under uvicorn's uvloop event loop (uvicorn[standard]) requests are metered, not refused."""
    pytest.importorskip("uvloop")
    child = subprocess.run(
        [sys.executable, "-c", ON_UVLOOP, json.dumps(gateway_config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert child.stdout.strip() == str([200] * 10 + [429] * 2)
