"""The hold sweeper: releases expired holds of balances nobody touches, exactly once.

Every script that opens or closes a hold keeps the balance in its partition's index, scored by
the balance's earliest hold expiry. The sweeper reads the balances whose score has passed and
runs a balance read on each: the read expires the due holds (the same Lua that every admission
runs, where ZREM decides who wins when two sweepers race) and re-indexes the balance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from metergate.core.errors import NotFound, StorageUnavailable
from metergate.core.flows import Command
from metergate.meter import AsyncMeter

__all__ = ["sweep_holds", "sweep_loop"]

log = logging.getLogger("metergate.worker")
BATCH = 200


async def sweep_holds(meter: AsyncMeter) -> int:
    """Release every expired hold of every partition once; return how many balances were swept."""
    core = meter.core
    now_ms = int(core.clock() * 1000)
    swept = 0
    for partition in range(core.keys.partitions):
        due = await meter.storage.run(
            Command(
                (
                    "ZRANGEBYSCORE",
                    core.keys.holds(partition),
                    "-inf",
                    str(now_ms),
                    "LIMIT",
                    "0",
                    str(BATCH),
                )
            )
        )
        for member in due or []:
            customer, _, name = str(member).partition("\x1f")
            try:
                await meter.run(core.balance_op(customer, name, "read"))
            except NotFound:
                await meter.storage.run(Command(("ZREM", core.keys.holds(partition), member)))
            swept += 1
    return swept


async def sweep_loop(meter: AsyncMeter, stop: asyncio.Event, interval_s: float = 1.0) -> None:
    """Sweep expired holds every `interval_s` until `stop` is set."""
    while not stop.is_set():
        try:
            await sweep_holds(meter)
        except StorageUnavailable as exc:
            log.warning("hold sweep skipped: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
