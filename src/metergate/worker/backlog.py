"""The webhook backlog: outbox entries not yet done with (read by no worker, or still pending).

Measured from storage when `/metrics` is scraped, so it is right whichever process runs the
worker (`metergate serve` or a separate `metergate worker`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from metergate.core.errors import StorageUnavailable
from metergate.core.flows import Command
from metergate.core.keys import Keys
from metergate.storage import AsyncStorage
from metergate.worker.keys import GROUP

__all__ = ["webhook_backlog"]

_SCAN = 10_000


def _as_dict(group: Any) -> dict[str, Any]:
    if isinstance(group, Mapping):
        return {str(k): v for k, v in group.items()}
    flat = list(group)
    return {str(k): v for k, v in zip(flat[::2], flat[1::2], strict=True)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _partition_backlog(storage: AsyncStorage, stream: str) -> int:
    length = int(await storage.run(Command(("XLEN", stream))))
    if length == 0:
        return 0
    groups = [_as_dict(g) for g in await storage.run(Command(("XINFO", "GROUPS", stream)))]
    group = next((g for g in groups if _text(g.get("name")) == GROUP), None)
    if group is None:  # no worker has read this outbox yet: every entry waits
        return length
    pending = int(group.get("pending") or 0)
    lag = group.get("lag")
    if lag is None:  # Redis cannot tell after deletions: count what follows the group's cursor
        last = _text(group.get("last-delivered-id") or "0-0")
        unread = await storage.run(
            Command(("XRANGE", stream, f"({last}", "+", "COUNT", str(_SCAN)))
        )
        lag = len(unread)
    return pending + int(lag)


async def webhook_backlog(storage: AsyncStorage, keys: Keys) -> int | None:
    """Return how many outbox entries are not yet done with, or None when storage is down."""
    try:
        counts = await asyncio.gather(
            *(_partition_backlog(storage, keys.outbox(p)) for p in range(keys.partitions))
        )
    except StorageUnavailable:
        return None
    return sum(counts)
