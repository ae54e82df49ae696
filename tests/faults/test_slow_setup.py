"""A gateway whose connection set-up is slow (a busy machine, a far network) still meters a burst.

Every node of this module's Cluster is reached through a proxy that holds the first reply of each
new connection for a while, and the Cluster announces the proxies' ports, so that every connection
any client makes (startup node, slot discovery, each primary) starts late. One call fits in
`storage.timeout_ms`; the whole of a cold gateway's set-up (discovering the slots, connecting to
every primary, reading the eviction policy, loading the configured customers) does not. That
set-up is done once, shared, and outside any request's budget: the first burst is slower, not
refused.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.adapters.harness import serve_asgi

from conftest import RedisCluster
from metergate import Meter, MeteringMiddleware

from .conftest import API_KEY, config, start_cluster

pytestmark = pytest.mark.redis

# Each new connection's first reply is this late; one call's budget is twice that.
DELAY_S = 0.2
TIMEOUT_MS = 500


class SlowStartProxy:
    """Forward a loopback port to `upstream_port`, holding each connection's first reply."""

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> SlowStartProxy:
        self._thread.start()

        async def listen() -> int:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(creader, cwriter))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self._writers.add(cwriter)
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cwriter.transport.abort()
            self._writers.discard(cwriter)
            return
        self._writers.add(swriter)

        async def pump(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
        ) -> None:
            first = True
            while data := await reader.read(65536):
                if first:
                    first = False
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(pump(creader, swriter, 0.0), pump(sreader, cwriter, self.delay_s))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (cwriter, swriter):
                writer.transport.abort()
                self._writers.discard(writer)


class SlowCluster:
    """A Cluster reached only through slow-to-start proxies (its URL names them too)."""

    def __init__(self, cluster: RedisCluster, proxies: list[SlowStartProxy]) -> None:
        self.cluster = cluster
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p.port}" for p in proxies)

    def flush(self) -> None:
        self.cluster.flush()


@pytest.fixture(scope="module")
def slow_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlowCluster]:
    """A three-primary Cluster whose nodes announce slow-to-start proxies as their addresses."""
    cluster = start_cluster(tmp_path_factory.mktemp("slow-cluster"), replicas=0)
    proxies = [SlowStartProxy(node.port, DELAY_S).start() for node in cluster.nodes]
    try:
        for node, proxy in zip(cluster.nodes, proxies, strict=True):
            client = node.client()
            client.config_set("cluster-announce-bus-port", node.port + 10000)
            client.config_set("cluster-announce-port", proxy.port)
            client.close()
        # Every node must hand out the proxies' ports before a client asks.
        wanted = {proxy.port for proxy in proxies}
        deadline = time.monotonic() + 30
        for node in cluster.nodes:
            client = node.client()
            while {int(entry[2][1]) for entry in client.execute_command("CLUSTER", "SLOTS")} != (
                wanted
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Cluster did not announce the proxies in time")
                time.sleep(0.05)
            client.close()
        yield SlowCluster(cluster, proxies)
    finally:
        for proxy in proxies:
            proxy.stop()
        cluster.stop()


async def ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The app behind the gateway: 200 for everything, and a lifespan with nothing to do."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def gateway_config(cluster: SlowCluster) -> dict[str, Any]:
    """The fault suite's plan behind one metered route, with a budget that fits one call only."""
    out = config(cluster.url, "c")
    out["storage"]["timeout_ms"] = TIMEOUT_MS
    out["routes"] = [{"path": "/x", "meter": [{"metric": "calls"}]}]
    return out


def burst(url: str, count: int) -> list[int]:
    """Send `count` concurrent requests with the customer's key; return their statuses."""
    results: list[int] = []
    limits = httpx.Limits(max_connections=count)
    with httpx.Client(base_url=url, timeout=30, limits=limits) as client:

        def hit() -> None:
            r = client.get("/x", headers={"Authorization": f"Bearer {API_KEY}"})
            results.append(r.status_code)

        threads = [threading.Thread(target=hit) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return results


def test_a_cold_gateway_admits_a_burst_when_set_up_outlasts_the_budget(
    slow_cluster: SlowCluster,
) -> None:
    """Forty concurrent first requests to a gateway served with its lifespan (set-up starts at
    start-up), whose Cluster set-up takes longer than one request's storage budget, are all
    admitted and each counted once."""
    slow_cluster.flush()
    cfg = gateway_config(slow_cluster)
    with serve_asgi(MeteringMiddleware(ok, cfg), lifespan="on") as url:
        statuses = burst(url, 40)
    assert statuses.count(200) == 40, sorted(statuses)
    with Meter(cfg) as meter:
        assert meter.usage("c", "calls")["value"] == 40


def test_a_burst_shares_the_set_up_without_a_lifespan(slow_cluster: SlowCluster) -> None:
    """Without a lifespan (nothing started before the first request), forty concurrent first
    requests share one set-up outside their budgets: all admitted, each counted once."""
    slow_cluster.flush()
    cfg = gateway_config(slow_cluster)
    app = MeteringMiddleware(ok, cfg)

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                auth = {"Authorization": f"Bearer {API_KEY}"}
                replies = await asyncio.gather(*(client.get("/x", headers=auth) for _ in range(40)))
        finally:
            await app.meter.aclose()
        return [r.status_code for r in replies]

    statuses = asyncio.run(main())
    assert statuses.count(200) == 40, sorted(statuses)
    with Meter(cfg) as meter:
        assert meter.usage("c", "calls")["value"] == 40
