"""Fault 1: Redis killed under load, restarted with its AOF: fail fast, reconnect, count once."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from conftest import RedisProcess
from metergate import AsyncMeter, Meter, StorageUnavailable

from .conftest import HANG_S, config, run

pytestmark = pytest.mark.redis


def _final_check(meter: Meter, expected_calls: int) -> None:
    """The counter, the balance and the ledger all say each key was counted exactly once."""
    assert meter.usage("c", "calls")["value"] == expected_calls
    assert meter.balance("c", "credits").amount == 1_000_000 - expected_calls
    usage_lines = [e for e in meter.ledger("c", 10_000) if e["kind"] == "usage"]
    assert sum(e["count"] for e in usage_lines) == expected_calls
    assert sum(e["delta"] for e in usage_lines) == -expected_calls


def test_async_meter_fails_fast_while_redis_is_dead_and_reconnects(aof_redis: RedisProcess) -> None:
    """AsyncMeter admissions in flight and during an outage raise StorageUnavailable fast, succeed
    after the restart, and retried keys are counted exactly once."""

    async def main() -> tuple[dict[str, Any], list[float]]:
        meter = AsyncMeter(config(aof_redis.url))
        outcomes: dict[str, Any] = {}
        failing: list[float] = []
        stop = asyncio.Event()

        async def worker(w: int) -> None:
            i = 0
            while not stop.is_set():
                key = f"w{w}-{i}"
                i += 1
                start = time.monotonic()
                try:
                    outcomes[key] = await meter.admit("c", {"calls": 1}, key)
                except StorageUnavailable as exc:
                    outcomes[key] = exc
                    failing.append(time.monotonic() - start)
                    await asyncio.sleep(0.01)

        try:
            assert (await meter.admit("c", {"calls": 1}, "warm")).allowed
            workers = [asyncio.ensure_future(worker(w)) for w in range(50)]
            await asyncio.sleep(0.3)
            aof_redis.stop()  # SIGKILL with 50 admissions in flight
            await asyncio.sleep(0.5)
            aof_redis.start()
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), HANG_S)
            # outcome unknown: retry every failed key with the same key
            for key, outcome in list(outcomes.items()):
                if isinstance(outcome, StorageUnavailable):
                    outcomes[key] = await meter.admit("c", {"calls": 1}, key)
        finally:
            await meter.aclose()
        return outcomes, failing

    outcomes, failing = run(main())
    assert failing, "the kill should have failed some admissions"
    assert max(failing) < HANG_S
    assert all(d.allowed for d in outcomes.values())
    with Meter(config(aof_redis.url)) as meter:
        _final_check(meter, len(outcomes) + 1)


def test_sync_meter_fails_fast_while_redis_is_dead_and_reconnects(aof_redis: RedisProcess) -> None:
    """Threads admitting through one Meter get StorageUnavailable fast while Redis is dead, succeed
    after its restart, and retried keys are counted exactly once."""
    meter = Meter(config(aof_redis.url))
    outcomes: dict[str, Any] = {}
    failing: list[float] = []
    stop = threading.Event()

    def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            key = f"w{w}-{i}"
            i += 1
            start = time.monotonic()
            try:
                outcomes[key] = meter.admit("c", {"calls": 1}, key)
            except StorageUnavailable as exc:
                outcomes[key] = exc
                failing.append(time.monotonic() - start)
                time.sleep(0.01)

    try:
        assert meter.admit("c", {"calls": 1}, "warm").allowed
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        aof_redis.stop()
        time.sleep(0.5)
        aof_redis.start()
        time.sleep(0.3)
        stop.set()
        for thread in threads:
            thread.join(HANG_S)
            assert not thread.is_alive()
        for key, outcome in list(outcomes.items()):
            if isinstance(outcome, StorageUnavailable):
                outcomes[key] = meter.admit("c", {"calls": 1}, key)
        assert failing, "the kill should have failed some admissions"
        assert max(failing) < HANG_S
        assert all(d.allowed for d in outcomes.values())
        _final_check(meter, len(outcomes) + 1)
    finally:
        meter.close()
