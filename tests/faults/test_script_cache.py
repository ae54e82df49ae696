"""Fault 4: the script cache emptied between calls (SCRIPT FLUSH, a restart with the data kept)."""

from __future__ import annotations

import asyncio

import pytest

from conftest import RedisProcess
from metergate import AsyncMeter, Meter

from .conftest import config, run

pytestmark = pytest.mark.redis


def _flush_scripts(server: RedisProcess) -> None:
    client = server.client()
    try:
        client.script_flush()
    finally:
        client.close()


def test_sync_meter_reloads_scripts_after_a_flush_and_a_restart(aof_redis: RedisProcess) -> None:
    """After SCRIPT FLUSH, and after a restart that kept the data, blocking admissions load their
    script and succeed, each counted once."""
    with Meter(config(aof_redis.url)) as meter:
        assert meter.admit("c", {"calls": 1}, "a").allowed
        _flush_scripts(aof_redis)
        assert meter.admit("c", {"calls": 1}, "b").assets["calls"].value == 2
        aof_redis.stop()
        aof_redis.start()
        assert meter.admit("c", {"calls": 1}, "c").assets["calls"].value == 3
        assert meter.balance("c", "credits").amount == 1_000_000 - 3


def test_async_meter_reloads_scripts_after_a_flush_and_a_restart(aof_redis: RedisProcess) -> None:
    """After SCRIPT FLUSH, and after a restart that kept the data, pipelined admissions load their
    script and succeed, each counted once."""

    async def main() -> None:
        async with AsyncMeter(config(aof_redis.url)) as meter:
            assert (await meter.admit("c", {"calls": 1}, "a")).allowed
            _flush_scripts(aof_redis)
            assert (await meter.admit("c", {"calls": 1}, "b")).assets["calls"].value == 2
            aof_redis.stop()
            aof_redis.start()
            # stop() and start() block the loop; a serving loop sees the old socket close at once
            await asyncio.sleep(0.05)
            assert (await meter.admit("c", {"calls": 1}, "c")).assets["calls"].value == 3
            assert (await meter.balance("c", "credits")).amount == 1_000_000 - 3

    run(main())
