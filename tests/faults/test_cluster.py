"""Faults on Redis Cluster (three primaries, a replica each): script cache, eviction policy, a node
that lost its data, a paused primary, and a primary failover (last: it kills a node)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from conftest import RedisCluster, RedisProcess
from metergate import AsyncMeter, Meter, StorageUnavailable
from metergate.core.keys import Keys
from metergate.storage import UnsafeStorage

from .conftest import HANG_S, config, node_of, primaries, run, start_cluster, timed
from .test_paused import paused

pytestmark = pytest.mark.redis

CUSTOMERS = tuple(f"cust{i}" for i in range(30))
KEYS = Keys()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Cluster of this module alone: three primaries with one replica each."""
    started = start_cluster(tmp_path_factory.mktemp("faults-cluster"), replicas=1)
    yield started
    started.stop()


@pytest.fixture
def fresh(cluster: RedisCluster) -> RedisCluster:
    """The module's Cluster, emptied, with its script caches and statistics reset."""
    for node in primaries(cluster):
        client = node.client()
        try:
            client.flushall()
            client.script_flush()
            client.config_set("maxmemory-policy", "noeviction")
            client.config_resetstat()
        finally:
            client.close()
    return cluster


def one_per_node(cluster: RedisCluster) -> dict[int, str]:
    """A customer served by each primary: {port: customer}."""
    out: dict[int, str] = {}
    for customer in CUSTOMERS:
        out.setdefault(node_of(cluster, KEYS.customer(customer)).port, customer)
    assert len(out) == 3
    return out


def flush_scripts(cluster: RedisCluster) -> None:
    for node in primaries(cluster):
        client = node.client()
        client.script_flush()
        client.close()


def evalsha_calls(node: RedisProcess) -> int:
    client = node.client()
    try:
        stats: dict[str, Any] = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_cluster_meters_reload_scripts_after_script_flush(fresh: RedisCluster) -> None:
    """After SCRIPT FLUSH on every primary, sync and asyncio Cluster admissions load their script
    and succeed."""
    customers = list(one_per_node(fresh).values())
    cfg = config(fresh.url, *CUSTOMERS)
    with Meter(cfg) as meter:
        for customer in customers:
            assert meter.admit(customer, {"calls": 1}).allowed
        flush_scripts(fresh)
        for customer in customers:
            assert meter.admit(customer, {"calls": 1}).assets["calls"].value == 2

    async def main() -> None:
        async with AsyncMeter(cfg) as meter:
            flush_scripts(fresh)
            for customer in customers:
                assert (await meter.admit(customer, {"calls": 1})).assets["calls"].value == 3

    run(main())


def test_cluster_with_one_evicting_primary_is_refused(fresh: RedisCluster) -> None:
    """One primary with an evicting maxmemory-policy is enough for the Cluster to be refused, naming
    that node."""
    node = primaries(fresh)[1]
    client = node.client()
    try:
        client.config_set("maxmemory-policy", "allkeys-lfu")
        with (
            Meter(config(fresh.url, *CUSTOMERS)) as meter,
            pytest.raises(UnsafeStorage, match=f"{node.port}: allkeys-lfu"),
        ):
            meter.admit(CUSTOMERS[0], {"calls": 1})
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.close()


def test_a_cluster_node_that_lost_its_data_is_refused_and_never_refilled(
    fresh: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Customers on a primary that lost its data get StorageUnavailable from running and new
    processes alike, which re-create nothing there while serving the other nodes."""
    per_node = one_per_node(fresh)
    victim_port, lost = next(iter(per_node.items()))
    kept = [c for port, c in per_node.items() if port != victim_port]
    victim = next(n for n in fresh.nodes if n.port == victim_port)
    cfg = config(fresh.url, *CUSTOMERS)
    with Meter(cfg) as running:
        for customer in per_node.values():
            assert running.admit(customer, {"calls": 1}).allowed
        flush = victim.client()
        flush.flushall()
        flush.close()
        with pytest.raises(StorageUnavailable, match="lost its data"):
            running.admit(lost, {"calls": 1})
        for customer in kept:
            assert running.admit(customer, {"calls": 1}).assets["calls"].value == 2
    with caplog.at_level(logging.ERROR, logger="metergate"), Meter(cfg) as newcomer:
        for customer in kept:
            assert newcomer.admit(customer, {"calls": 1}).assets["calls"].value == 3
        with pytest.raises(StorageUnavailable, match="lost its data"):
            newcomer.admit(lost, {"calls": 1})
    assert any("have no sentinel" in r.getMessage() for r in caplog.records)
    client = victim.client()
    try:
        assert [k for k in client.scan_iter() if ":b:" in k or ":c:" in k] == []
    finally:
        client.close()


def test_a_burst_of_asyncio_cluster_admissions_waits_for_connections(fresh: RedisCluster) -> None:
    """A burst of 1,000 concurrent asyncio Cluster admissions all succeed instead of failing on
    exhausted node pools (MaxConnectionsError)."""

    async def main() -> None:
        # A budget for the burst's last calls too: on a busy machine, Redis answering 1,000
        # queued scripts can take longer than the fault suite's usual 200 ms.
        async with AsyncMeter(config(fresh.url, *CUSTOMERS, timeout_ms=5000)) as meter:
            decisions = await asyncio.gather(
                *(meter.admit(CUSTOMERS[i % 30], {"calls": 1}) for i in range(1000))
            )
            assert all(d.allowed for d in decisions)
            values = [(await meter.usage(c, "calls"))["value"] for c in CUSTOMERS]
            assert sum(values) == 1000

    run(main())


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_paused_primary_gets_each_script_once(fresh: RedisCluster, flavour: str) -> None:
    """An admission to a stopped primary fails with StorageUnavailable without the Cluster client
    re-sending its EVALSHA, and its keyed retry counts once."""
    customer = next(iter(one_per_node(fresh).values()))
    node = node_of(fresh, KEYS.customer(customer))
    cfg = config(fresh.url, *CUSTOMERS)

    if flavour == "sync":
        with Meter(cfg) as meter:
            assert meter.admit(customer, {"calls": 1}).allowed
            before = evalsha_calls(node)
            with paused(node):
                outcome, took = timed(lambda: meter.admit(customer, {"calls": 1}, "slow"))
            time.sleep(0.2)  # let the resumed node run what was queued
            assert isinstance(outcome, StorageUnavailable)
            assert took < HANG_S
            assert evalsha_calls(node) == before + 1
            assert meter.admit(customer, {"calls": 1}, "slow").assets["calls"].value == 2
        return

    async def main() -> None:
        async with AsyncMeter(cfg) as meter:
            assert (await meter.admit(customer, {"calls": 1})).allowed
            before = evalsha_calls(node)
            start = time.monotonic()
            with paused(node), pytest.raises(StorageUnavailable):
                await meter.admit(customer, {"calls": 1}, "slow")
            assert time.monotonic() - start < HANG_S
            time.sleep(0.2)
            assert evalsha_calls(node) == before + 1
            for _ in range(3):  # the first call after a timeout re-reads the topology
                try:
                    retried = await meter.admit(customer, {"calls": 1}, "slow")
                    break
                except StorageUnavailable:
                    continue
            assert retried.assets["calls"].value == 2

    run(main())


def _replicated(node: RedisProcess) -> None:
    """Wait until the primary's replica has everything it wrote."""
    client = node.client()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            info = client.info("replication")
            replica = info.get("slave0", {})
            if replica and int(replica["offset"]) == int(info["master_repl_offset"]):
                return
            time.sleep(0.02)
        raise AssertionError("the replica did not catch up")
    finally:
        client.close()


def test_a_primary_failover_fails_admissions_cleanly_and_counts_each_key_once(
    fresh: RedisCluster,
) -> None:
    """A killed primary's customers get StorageUnavailable until its replica is promoted and succeed
    afterwards, sync and asyncio, with every key counted exactly once."""
    per_node = one_per_node(fresh)
    victim_port, customer = next(iter(per_node.items()))
    victim = next(n for n in fresh.nodes if n.port == victim_port)
    cfg = config(fresh.url, *CUSTOMERS)

    async def main(meter: Meter) -> int:
        # one event loop for the asyncio meter; the blocking meter's calls simply block it
        async with AsyncMeter(cfg) as async_meter:
            assert meter.admit(customer, {"calls": 1}, "k0").allowed
            assert (await async_meter.admit(customer, {"calls": 1}, "k1")).allowed
            _replicated(victim)
            victim.stop()
            outcomes: dict[str, Any] = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                key = f"k{len(outcomes) + 2}"
                outcome, took = timed(lambda key=key: meter.admit(customer, {"calls": 1}, key))
                assert took < HANG_S
                outcomes[key] = outcome
                if not isinstance(outcome, Exception):
                    break
                assert isinstance(outcome, StorageUnavailable), outcome
                time.sleep(0.1)
            failed = [k for k, o in outcomes.items() if isinstance(o, Exception)]
            assert failed, "the outage should have failed some admissions"
            assert len(failed) < len(outcomes), "no promotion within 30 s"
            assert node_of(fresh, KEYS.customer(customer)).port != victim_port
            for key in failed:
                assert meter.admit(customer, {"calls": 1}, key).allowed
            for _ in range(5):  # its first calls find the old primary gone and re-read the slots
                try:
                    assert (await async_meter.admit(customer, {"calls": 1}, "k-async")).allowed
                    break
                except StorageUnavailable:
                    time.sleep(0.1)
            else:
                raise AssertionError("the asyncio Cluster client did not recover")
            return 2 + len(outcomes) + 1

    with Meter(cfg) as meter:
        expected = run(main(meter))
        assert meter.usage(customer, "calls")["value"] == expected
        usage = [e for e in meter.ledger(customer, 1000) if e["kind"] == "usage"]
        assert sum(e["count"] for e in usage) == expected == -sum(e["delta"] for e in usage)
        assert meter.balance(customer, "credits").amount == 1_000_000 - expected
        for other in per_node.values():
            if other != customer:
                assert meter.admit(other, {"calls": 1}).allowed
    probe = victim.client()
    with pytest.raises(redis.ConnectionError):
        probe.ping()
    probe.close()
