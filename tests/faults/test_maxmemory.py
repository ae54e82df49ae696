"""Fault 6: Redis at maxmemory with noeviction: admissions fail cleanly, then recover."""

from __future__ import annotations

import pytest
import redis

from conftest import RedisProcess
from metergate import AsyncMeter, Meter, StorageUnavailable

from .conftest import config, run, snapshot

pytestmark = pytest.mark.redis


def _fill(client: redis.Redis) -> None:
    """Write junk, then lower maxmemory just below what is used: Redis is now out of memory."""
    client.config_set("maxmemory-policy", "noeviction")
    for i in range(8):
        client.set(f"junk:{i}", "x" * 256_000)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used - 64_000)


def _free(client: redis.Redis) -> None:
    client.delete(*(f"junk:{i}" for i in range(8)))


def test_sync_multi_asset_admission_at_maxmemory_writes_nothing_and_recovers(
    bare_redis: RedisProcess,
) -> None:
    """A two-asset admission on a Redis at maxmemory raises StorageUnavailable naming the memory
    limit, changes no key, and succeeds once memory is freed."""
    client = bare_redis.client()
    try:
        with Meter(config(bare_redis.url)) as meter:
            assert meter.admit("c", {"calls": 1, "tokens": 10}).allowed
            _fill(client)
            before = snapshot(client)
            with pytest.raises(StorageUnavailable, match="out of memory"):
                meter.admit("c", {"calls": 2, "tokens": 50}, "full")
            assert snapshot(client) == before
            _free(client)
            decision = meter.admit("c", {"calls": 2, "tokens": 50}, "full")
            assert decision.allowed
            assert decision.assets["calls"].value == 3 and decision.assets["tokens"].value == 60
            assert decision.balances == {"credits": 1_000_000 - 1 - 1 - 2 - 5}
    finally:
        client.close()


def test_async_multi_asset_admission_at_maxmemory_writes_nothing_and_recovers(
    bare_redis: RedisProcess,
) -> None:
    """A pipelined two-asset admission on a Redis at maxmemory raises StorageUnavailable, changes no
    key, and succeeds once memory is freed."""
    client = bare_redis.client()

    async def main() -> None:
        async with AsyncMeter(config(bare_redis.url)) as meter:
            assert (await meter.admit("c", {"calls": 1, "tokens": 10})).allowed
            _fill(client)
            before = snapshot(client)
            with pytest.raises(StorageUnavailable, match="out of memory"):
                await meter.admit("c", {"calls": 2, "tokens": 50}, "full")
            assert snapshot(client) == before
            _free(client)
            decision = await meter.admit("c", {"calls": 2, "tokens": 50}, "full")
            assert decision.allowed and decision.assets["tokens"].value == 60

    try:
        run(main())
    finally:
        client.close()
