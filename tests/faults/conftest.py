"""Fixtures for the fault suite: redis-servers a test may kill, pause or restart, and helpers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from redis.crc import key_slot
from tests.builders import asset, counters, customer, gateway, plan, tier

from conftest import RedisCluster, RedisProcess
from metergate.config import hash_api_key

T = TypeVar("T")

TIMEOUT_MS = 200
# Only to detect a hang: a call failing "within about the timeout" must not take longer than this.
HANG_S = 5.0
API_KEY = "key-of-c"


def config(url: str, *customers: str, **storage: Any) -> dict[str, Any]:
    """Two metrics priced on one balance: `calls` (1 credit each) and `tokens` (1 per 10)."""

    def priced(per: int) -> dict[str, Any]:
        price = {"per_unit": 1, "per": per}
        return asset(tier(0, price=price), period="month", balance="credits")

    return gateway(
        storage_url=url,
        storage={"timeout_ms": TIMEOUT_MS, **storage},
        metrics=counters("calls", "tokens"),
        plans={"p": plan(calls=priced(1), tokens=priced(10))},
        customers={
            name: customer(
                "p", credits=1_000_000, api_keys=[hash_api_key(API_KEY)] if name == "c" else []
            )
            for name in customers or ("c", "d")
        },
    )


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh event loop."""
    return asyncio.run(coro)


def timed(fn: Callable[[], T]) -> tuple[T | BaseException, float]:
    """Call `fn` and return (its result or the exception it raised, seconds it took)."""
    start = time.monotonic()
    try:
        out: T | BaseException = fn()
    except Exception as exc:
        out = exc
    return out, time.monotonic() - start


def snapshot(client: redis.Redis, *, skip: str = "junk") -> dict[str, Any]:
    """Every key of a node with its type and content (for "nothing changed" checks)."""
    out: dict[str, Any] = {}
    for key in client.scan_iter(count=1000):
        if key.startswith(skip):
            continue
        kind = client.type(key)
        if kind == "hash":
            value: Any = client.hgetall(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = client.xrange(key)
        elif kind == "set":
            value = sorted(client.smembers(key))
        else:
            value = client.get(key)
        out[key] = (kind, value)
    return out


def safe_port() -> int:
    """A free loopback port p whose Cluster bus port p + 10000 is also free and below 65536."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def start_cluster(workdir: Path, replicas: int) -> RedisCluster:
    """Start a Cluster of three primaries (and `replicas` replicas each) on safe ports."""
    cluster = RedisCluster(workdir, replicas=replicas)
    for node in cluster.nodes:
        node.port = safe_port()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _cluster_nodes(cluster: RedisCluster) -> list[list[str]]:
    """`CLUSTER NODES` as a live node sees it, one list of fields per node."""
    for node in cluster.nodes:
        if node.proc is None:
            continue
        client = node.client()
        try:
            text = client.execute_command("CLUSTER", "NODES")
        except redis.ConnectionError:
            continue
        finally:
            client.close()
        return [line.split() for line in str(text).splitlines()]
    raise LookupError("no live node")


def _process(cluster: RedisCluster, fields: list[str]) -> RedisProcess:
    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
    return next(n for n in cluster.nodes if n.port == port)


def primaries(cluster: RedisCluster) -> list[RedisProcess]:
    """The nodes serving slots now."""
    return [
        _process(cluster, f)
        for f in _cluster_nodes(cluster)
        if "master" in f[2] and "fail" not in f[2] and len(f) > 8
    ]


def node_of(cluster: RedisCluster, key: str) -> RedisProcess:
    """The node that serves `key` now (its slot's primary, as a live node sees it)."""
    slot = key_slot(key.encode())
    for fields in _cluster_nodes(cluster):
        if "master" not in fields[2] or "fail" in fields[2]:
            continue
        for part in fields[8:]:
            low, _, high = part.partition("-")
            if low.isdigit() and int(low) <= slot <= int(high or low):
                return _process(cluster, fields)
    raise LookupError(f"no node serves slot {slot}")


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone, keeping its data across a kill and restart (AOF).

    `appendfsync no` is enough here: Redis writes the AOF before it replies, and a killed process
    loses nothing the kernel already has (fsync only matters when the host goes down).
    """
    server = RedisProcess(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "no")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bare_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone, persisting nothing: a restart empties it."""
    server = RedisProcess(tmp_path / "redis")
    server.start()
    yield server
    server.stop()
