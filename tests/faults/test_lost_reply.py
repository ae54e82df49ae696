"""Fault 3: the script ran but its reply was lost (a proxy drops or holds it): outcome unknown."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from conftest import RedisProcess
from metergate import AsyncMeter, Meter, StorageUnavailable

from .conftest import HANG_S, config, run, timed
from .proxy import FaultProxy

pytestmark = pytest.mark.redis


@pytest.fixture
def proxy(aof_redis: RedisProcess) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of this test's redis-server."""
    fault_proxy = FaultProxy(aof_redis.port).start()
    yield fault_proxy
    fault_proxy.stop()


def _charged_once(meter: Meter, amount: int) -> None:
    """Customer c's balance, counter and ledger show exactly one admission of `amount`."""
    assert meter.usage("c", "calls")["value"] == amount
    assert meter.balance("c", "credits").amount == 1_000_000 - amount
    usage = [e for e in meter.ledger("c") if e["kind"] == "usage"]
    assert [(e["delta"], e["count"]) for e in usage] == [(-amount, 1)]


@pytest.mark.parametrize("fault", ["drop", "hold"])
def test_sync_lost_reply_is_outcome_unknown_and_a_keyed_retry_debits_once(
    proxy: FaultProxy, aof_redis: RedisProcess, fault: str
) -> None:
    """A blocking admission whose reply is lost raises StorageUnavailable after sending EVALSHA
    once, and its retry with the same key debits once."""
    with Meter(config(proxy.url)) as meter:
        meter.balance("c", "credits")  # connect and bootstrap through the proxy
        sent = proxy.count("EVALSHA")
        proxy.arm(fault, "EVALSHA")
        outcome, took = timed(lambda: meter.admit("c", {"calls": 4}, "order-1"))
        assert isinstance(outcome, StorageUnavailable)
        assert took < HANG_S
        assert proxy.count("EVALSHA") == sent + 1
        time.sleep(0.3)  # a client retrying on its own would have re-sent by now
        assert proxy.count("EVALSHA") == sent + 1
        retried = meter.admit("c", {"calls": 4}, "order-1")
        assert retried.allowed and retried.assets["calls"].value == 4
    with Meter(config(aof_redis.url)) as direct:
        _charged_once(direct, 4)


@pytest.mark.parametrize("fault", ["drop", "hold"])
def test_async_lost_reply_is_outcome_unknown_and_a_keyed_retry_debits_once(
    proxy: FaultProxy, aof_redis: RedisProcess, fault: str
) -> None:
    """A pipelined admission whose reply is lost raises StorageUnavailable after sending EVALSHA
    once, and its retry with the same key debits once."""

    async def main() -> None:
        async with AsyncMeter(config(proxy.url)) as meter:
            await meter.balance("c", "credits")
            sent = proxy.count("EVALSHA")
            proxy.arm(fault, "EVALSHA")
            start = time.monotonic()
            with pytest.raises(StorageUnavailable):
                await meter.admit("c", {"calls": 4}, "order-1")
            assert time.monotonic() - start < HANG_S
            assert proxy.count("EVALSHA") == sent + 1
            retried = await meter.admit("c", {"calls": 4}, "order-1")
            assert retried.allowed and retried.assets["calls"].value == 4

    run(main())
    with Meter(config(aof_redis.url)) as direct:
        _charged_once(direct, 4)


def test_the_proxy_sees_the_resends_of_a_client_that_retries(proxy: FaultProxy) -> None:
    """As a control, a redis-py client with retries (the default since redis-py 6) re-sends a
    script whose reply was lost and the proxy counts both sends."""
    client = redis.Redis(
        port=proxy.port, retry=Retry(NoBackoff(), 10), retry_on_error=[redis.ConnectionError]
    )
    try:
        sha = client.script_load("return redis.call('INCR', KEYS[1])")
        proxy.arm("drop", "EVALSHA")
        assert client.evalsha(sha, 1, "counter") == 2  # ran twice: the first reply was dropped
        assert proxy.count("EVALSHA") == 2
    finally:
        client.close()
