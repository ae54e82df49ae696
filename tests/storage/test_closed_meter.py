"""A closed AsyncMeter stays closed: a late call (a settlement at shutdown) opens no connection."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from tests.conftest import RedisProcess, with_storage
from tests.storage.credits import config

from metergate import AsyncMeter
from metergate.core.errors import StorageUnavailable

pytestmark = pytest.mark.redis


def test_a_closed_async_meter_refuses_calls_and_opens_no_connection(
    redis_server: RedisProcess,
) -> None:
    """After aclose, admit and settle raise StorageUnavailable and Redis sees no new client."""
    name = f"meter-{uuid.uuid4().hex[:8]}"
    probe = redis_server.client()

    def ours() -> int:
        return sum(1 for c in probe.client_list() if c["name"] == name)

    async def main() -> None:
        meter = AsyncMeter(with_storage(config(), redis_server.url))
        assert (await meter.admit("c", {"calls": 1})).allowed
        conn = meter.storage.pipelined
        assert conn is not None
        await conn.call("CLIENT", "SETNAME", name, timeout=2.0)
        assert ours() == 1
        await meter.aclose()
        for _ in range(3):
            with pytest.raises(StorageUnavailable, match="closed"):
                await meter.admit("c", {"calls": 1})
        await asyncio.sleep(0.05)
        assert ours() == 0

    asyncio.run(main())
    probe.close()


def test_a_reopened_async_meter_connects_again(redis_server: RedisProcess) -> None:
    """`reopen` (an ASGI lifespan starting again) lets calls through on a fresh connection."""

    redis_server.client().flushall()

    async def main() -> None:
        meter = AsyncMeter(with_storage(config(), redis_server.url))
        assert (await meter.admit("c", {"calls": 1})).allowed
        await meter.aclose()
        meter.reopen()
        assert (await meter.admit("c", {"calls": 1})).assets["calls"].value == 2
        await meter.aclose()

    asyncio.run(main())
