"""Fault 5: Redis restarted empty (no persistence): detected, never read as zero or unknown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from conftest import RedisProcess
from metergate import AsyncMeter, Meter, NotFound, StorageUnavailable
from metergate.core.flows import LOST_DATA

from .conftest import API_KEY, config, run

pytestmark = pytest.mark.redis


def _lost(fn: Callable[[], Any]) -> None:
    with pytest.raises(StorageUnavailable, match="lost its data"):
        fn()


def _nothing_recreated(server: RedisProcess) -> None:
    """No balance or customer came back: the emptied Redis holds at most what reads left."""
    client = server.client()
    try:
        keys = list(client.scan_iter())
    finally:
        client.close()
    assert not [k for k in keys if ":b:" in k or ":c:" in k or k.endswith("api-keys")], keys


def test_sync_meter_refuses_to_serve_from_a_redis_that_lost_its_data(
    bare_redis: RedisProcess,
) -> None:
    """After an empty restart, a process that had loaded the store raises StorageUnavailable (not
    401, 402 or 404) for admissions, key lookups, reads and customer writes, and re-creates
    nothing."""
    with Meter(config(bare_redis.url)) as meter:
        assert meter.admit("c", {"calls": 1}).allowed
        assert meter.customer_for_key(API_KEY) == "c"
        assert meter.customer_for_key("nobody's key") is None
        bare_redis.stop()
        bare_redis.start()
        _lost(lambda: meter.admit("c", {"calls": 1}))
        _lost(lambda: meter.admit("someone-else", {"calls": 1}))
        _lost(lambda: meter.customer_for_key(API_KEY))
        _lost(lambda: meter.balance("c", "credits"))
        _lost(lambda: meter.usage("c", "calls"))
        _lost(lambda: meter.topup("c", "credits", 5))
        spec = meter.config.customers["c"]
        _lost(lambda: meter.put_customer("c", spec))
        _lost(lambda: meter.create_balance("c", "credits", {"amount": 1_000_000}))
        _nothing_recreated(bare_redis)


def test_async_meter_refuses_to_serve_from_a_redis_that_lost_its_data(
    bare_redis: RedisProcess,
) -> None:
    """After an empty restart, AsyncMeter admissions, key lookups and reads raise StorageUnavailable
    and re-create nothing."""

    async def main() -> None:
        async with AsyncMeter(config(bare_redis.url)) as meter:
            assert (await meter.admit("c", {"calls": 1})).allowed
            bare_redis.stop()
            bare_redis.start()
            await asyncio.sleep(0.05)  # let the loop see the old connection close
            for call in (
                meter.admit("c", {"calls": 1}),
                meter.customer_for_key(API_KEY),
                meter.balance("c", "credits"),
            ):
                with pytest.raises(StorageUnavailable, match=LOST_DATA.split(";")[0]):
                    await call

    run(main())
    _nothing_recreated(bare_redis)


def test_a_missing_balance_is_402_only_while_its_slot_kept_its_data(
    bare_redis: RedisProcess,
) -> None:
    """A missing balance is a plain 402 (and 404 to a read) while its slot's sentinel exists, and
    StorageUnavailable once the sentinel is gone too."""
    with Meter(config(bare_redis.url)) as meter:
        keys = meter.core.keys
        assert meter.balance("c", "credits").amount == 1_000_000  # loads the customers
        client = bare_redis.client()
        try:
            client.delete(*keys.balance("c", "credits"))
            refused = meter.admit("c", {"calls": 1})
            assert (refused.status, refused.problem) == (402, "insufficient-credits")
            with pytest.raises(NotFound):
                meter.balance("c", "credits")
            client.delete(meter.core.sentinel(keys.partition("c")))
        finally:
            client.close()
        _lost(lambda: meter.admit("c", {"calls": 1}))
        _lost(lambda: meter.balance("c", "credits"))


def test_a_fresh_store_is_bootstrapped_and_sentinelled(bare_redis: RedisProcess) -> None:
    """A first start on an empty Redis loads the customers and writes one sentinel per partition
    plus one beside the API keys, which a second process keeps."""
    cfg = config(bare_redis.url)
    with Meter(cfg) as first, Meter(cfg) as second:
        assert first.admit("c", {"calls": 1}, "k").allowed
        assert second.admit("c", {"calls": 1}, "k").assets["calls"].value == 1
        client = bare_redis.client()
        try:
            sentinels = [k for k in client.scan_iter(match="*sentinel*")]
        finally:
            client.close()
        assert len(sentinels) == first.core.keys.partitions + 1


def test_a_store_reloaded_by_a_newer_process_is_still_a_loss_to_older_ones(
    bare_redis: RedisProcess,
) -> None:
    """A newer process cannot tell an emptied Redis from a first start and loads it afresh, but a
    process that saw the old store still refuses what it cannot find, since the sentinels are new."""
    with Meter(config(bare_redis.url)) as older:
        assert older.admit("c", {"calls": 1}).allowed
        bare_redis.stop()
        bare_redis.start()
        with Meter(config(bare_redis.url)) as newer:
            assert newer.balance("c", "credits").amount == 1_000_000  # re-created: the limit
            assert newer.customer_for_key("nobody's key") is None
        _lost(lambda: older.customer_for_key("nobody's key"))
        _lost(lambda: older.admit("someone-else", {"calls": 1}))


def test_a_bootstrap_retried_after_the_store_emptied_refuses(bare_redis: RedisProcess) -> None:
    """A bootstrap that saw the sentinels, failed half-way and is retried after the store was
    emptied raises StorageUnavailable instead of loading the starting balances."""
    with Meter(config(bare_redis.url)) as first:
        first.balance("c", "credits")  # writes the sentinels
    with Meter(config(bare_redis.url)) as meter:
        real_run, calls = meter.storage.run, []

        def flaky(call: Any) -> Any:
            calls.append(call)
            if len(calls) == 3:  # after reading the sentinels, during the customers
                raise StorageUnavailable("connection to Redis lost; the outcome is unknown")
            return real_run(call)

        meter.storage.run = flaky  # type: ignore[method-assign]
        with pytest.raises(StorageUnavailable, match="outcome is unknown"):
            meter.balance("c", "credits")
        client = bare_redis.client()
        client.flushall()
        client.close()
        _lost(lambda: meter.balance("c", "credits"))
        _nothing_recreated(bare_redis)
