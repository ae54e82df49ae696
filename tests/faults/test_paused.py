"""Fault 2: Redis paused (SIGSTOP) past storage.timeout_ms, then resumed (SIGCONT)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from conftest import RedisProcess
from metergate import AsyncMeter, Meter, StorageUnavailable
from metergate.storage.pipelined import PipelinedConnection

from .conftest import HANG_S, config, run, timed

pytestmark = pytest.mark.redis


@contextmanager
def paused(server: RedisProcess) -> Iterator[None]:
    """SIGSTOP the server for the block; SIGCONT it whatever happens."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def test_sync_admission_to_a_paused_redis_fails_within_the_timeout(aof_redis: RedisProcess) -> None:
    """A blocking admission to a stopped Redis raises StorageUnavailable instead of hanging, and its
    keyed retry after SIGCONT counts once."""
    with Meter(config(aof_redis.url)) as meter:
        assert meter.admit("c", {"calls": 1}, "before").allowed
        with paused(aof_redis):
            outcome, took = timed(lambda: meter.admit("c", {"calls": 5}, "during"))
        assert isinstance(outcome, StorageUnavailable)
        assert took < HANG_S
        assert meter.admit("d", {"calls": 2}, "after").assets["calls"].value == 2
        assert meter.admit("c", {"calls": 5}, "during").allowed
        assert meter.usage("c", "calls")["value"] == 6


def test_async_admission_to_a_paused_redis_fails_and_replies_stay_with_their_callers(
    aof_redis: RedisProcess,
) -> None:
    """Pipelined admissions to a stopped Redis fail within about the timeout, and after SIGCONT a
    later admission gets its own result and retried keys count once."""

    async def main() -> None:
        async with AsyncMeter(config(aof_redis.url)) as meter:
            assert (await meter.admit("c", {"calls": 1}, "before")).allowed
            assert (await meter.admit("d", {"calls": 1}, "before")).allowed
            with paused(aof_redis):
                start = time.monotonic()
                # one admission times out inside the driver, another is cancelled by its caller
                outcomes = await asyncio.gather(
                    meter.admit("c", {"calls": 7}, "during"),
                    asyncio.wait_for(meter.admit("c", {"calls": 11}, "cancelled"), 0.05),
                    return_exceptions=True,
                )
                took = time.monotonic() - start
            assert isinstance(outcomes[0], StorageUnavailable)
            assert isinstance(outcomes[1], TimeoutError)
            assert took < HANG_S
            # had a late reply of c's admissions reached this caller, it would show c's values
            mine = await meter.admit("d", {"calls": 2}, "after")
            assert mine.customer == "d"
            assert mine.assets["calls"].value == 3
            assert mine.balances == {"credits": 1_000_000 - 3}
            for key, amount in (("during", 7), ("cancelled", 11)):
                assert (await meter.admit("c", {"calls": amount}, key)).allowed
            assert (await meter.usage("c", "calls"))["value"] == 1 + 7 + 11

    run(main())


def test_pipelined_connection_drops_late_replies_of_callers_that_gave_up(
    aof_redis: RedisProcess,
) -> None:
    """Late replies of callers cancelled while Redis was stopped are dropped, so the same connection
    hands the next caller its own reply."""

    async def main() -> None:
        conn = PipelinedConnection(aof_redis.url)
        try:
            client_id = await conn.call("CLIENT", "ID", timeout=1.0)
            with paused(aof_redis):
                late = [
                    asyncio.ensure_future(conn.call("ECHO", f"late-{i}", timeout=2.0))
                    for i in range(3)
                ]
                await asyncio.sleep(0.1)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
            # Redis resumes within the 2 s budget: the late replies arrive and are dropped
            assert await conn.call("ECHO", "mine", timeout=1.0) == "mine"
            assert await conn.call("CLIENT", "ID", timeout=1.0) == client_id  # same connection
        finally:
            await conn.aclose()

    run(main())


def test_pipelined_connection_abandons_a_stalled_socket_and_reconnects(
    aof_redis: RedisProcess,
) -> None:
    """Calls without a reply within their timeout raise StorageUnavailable and abort the silent
    connection, and after SIGCONT the next call reconnects and gets its own reply."""

    async def main() -> None:
        conn = PipelinedConnection(aof_redis.url)
        try:
            client_id = await conn.call("CLIENT", "ID", timeout=1.0)
            with paused(aof_redis):
                start = time.monotonic()
                results = await asyncio.gather(
                    *(conn.call("ECHO", f"lost-{i}", timeout=0.2) for i in range(5)),
                    return_exceptions=True,
                )
                took = time.monotonic() - start
            assert all(isinstance(r, StorageUnavailable) for r in results)
            assert took < HANG_S
            assert await conn.call("ECHO", "mine", timeout=1.0) == "mine"
            assert await conn.call("CLIENT", "ID", timeout=1.0) != client_id  # a new connection
        finally:
            await conn.aclose()

    run(main())
