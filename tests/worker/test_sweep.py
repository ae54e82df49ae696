"""The hold sweeper releases expired holds of untouched balances exactly once, also when racing."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from conftest import Clock, with_storage
from metergate import AsyncMeter
from metergate.worker.sweep import sweep_holds

CONFIG: dict[str, Any] = {
    "metrics": {},
    "plans": {},
    "customers": {
        f"c{i}": {"entitlement": {"plan": "p"}, "balances": {"credits": {"amount": 100}}}
        for i in range(3)
    },
}
CONFIG["plans"] = {"p": {"assets": {}}}


def test_sweeper_releases_expired_holds_once(storage_url: str, clock: Clock) -> None:
    """Three holds expire; two racing sweeps emit one reservation.expired each and empty the index."""

    async def scenario() -> None:
        meters = [AsyncMeter(with_storage(CONFIG, storage_url), clock=clock) for _ in range(2)]
        first = meters[0]
        for i in range(3):
            await first.reserve(f"c{i}", "credits", 10 + i, 5)
        await first.reserve("c0", "credits", 7, 3600)  # still live after the sweep
        assert await sweep_holds(first) == 0  # nothing due yet
        clock.advance(6)
        swept = await asyncio.gather(*(sweep_holds(m) for m in meters))
        assert sum(swept) >= 3
        assert await sweep_holds(first) == 0  # the index now points past the live hold
        expired = []
        client = first.storage.client
        for i in range(3):
            outbox = first.core.keys.outbox(first.core.keys.partition(f"c{i}"))
            for _, fields in await client.xrange(outbox, "-", "+"):
                if fields["type"] == "reservation.expired" and fields["customer"] == f"c{i}":
                    expired.append((f"c{i}", json.loads(fields["data"])["amount"]))
        assert sorted(expired) == [("c0", 10), ("c1", 11), ("c2", 12)]
        assert (await first.balance("c0", "credits")).held == 7
        assert (await first.balance("c1", "credits")).held == 0
        for m in meters:
            await m.aclose()

    asyncio.run(scenario())
