"""Cutting `usage.reported` windows and closing idle periods: the worker's two clocks.

Both only read what the admission script aggregated and call one script per unit of work
(report.lua per chunk of a window, close.lua per asset), so any number of workers may run them
at once: the scripts decide, atomically, what is emitted, and they emit each id once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

from metergate.core.errors import StorageUnavailable
from metergate.core.flows import Script
from metergate.core.history import history_keys
from metergate.core.keys import Keys
from metergate.storage import AsyncStorage
from metergate.worker.keys import WorkerKeys

__all__ = ["PeriodCloser", "UsageReporter", "window_of"]

_US = "\x1f"
_NETWORK_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
_KIND = {"CumulativeCounter": "C", "TotalCounter": "T", "Gauge": "G", "UpDownCounter": "U"}


def window_of(now_ms: int, interval_ms: int) -> tuple[int, int]:
    """Return the usage window [start, end) containing `now_ms`, aligned on the Unix epoch."""
    start = now_ms - now_ms % interval_ms
    return start, start + interval_ms


async def _read(fn: Any) -> Any:
    try:
        return await fn
    except _NETWORK_ERRORS as exc:
        raise StorageUnavailable(str(exc) or type(exc).__name__) from exc


@dataclass(slots=True)
class UsageReporter:
    """Turns each partition's closed usage windows into `usage.reported` events."""

    storage: AsyncStorage
    keys: WorkerKeys
    interval_ms: int
    grace_ms: int = 5_000
    """A window is cut this long after it ends, so gateways whose clocks lag can still add to it."""
    chunk: int = 200
    """Pairs per script call: one call never blocks Redis for long."""
    done_retention_ms: int = 7 * 86_400_000
    """How long a window is remembered as reported (late usage for it is carried forward)."""

    async def run(self, partition: int, now_ms: int, limit: int = 20) -> int:
        """Report every window of a partition that ended `grace_ms` ago; return events emitted."""
        client = self.storage.client
        due = await _read(
            client.zrangebyscore(
                self.keys.usage_open(partition),
                "-inf",
                now_ms - self.grace_ms,
                start=0,
                num=limit,
                withscores=True,
            )
        )
        emitted = 0
        for member, end in due:
            emitted += await self.report_window(partition, int(member), int(end), now_ms)
        return emitted

    async def report_window(self, partition: int, start_ms: int, end_ms: int, now_ms: int) -> int:
        """Report one window (pairs in chunks, then close it); return events emitted."""
        carry_start, carry_end = window_of(now_ms, self.interval_ms)
        window = self.keys.usage_window(partition, start_ms)
        emitted = 0
        for _round in range(3):
            names = await _read(self.storage.client.hkeys(window))
            pairs = sorted(
                {
                    (parts[1], parts[2])
                    for parts in (str(n).split(_US) for n in names)
                    if len(parts) == 3 and parts[0] != "r"
                }
            )
            bounds = (start_ms, end_ms, carry_start, carry_end, now_ms)
            for i in range(0, len(pairs), self.chunk):
                reply = await self._call(partition, *bounds, pairs[i : i + self.chunk])
                if reply[0] == "stale":
                    return emitted
                if reply[0] == "reported":
                    emitted += int(reply[1])
            reply = await self._call(partition, *bounds, None)
            if reply[0] != "more":
                return emitted
        return emitted

    async def _call(
        self,
        partition: int,
        start_ms: int,
        end_ms: int,
        carry_start: int,
        carry_end: int,
        now_ms: int,
        pairs: list[tuple[str, str]] | None,
    ) -> list[str]:
        keys = [
            self.keys.usage_window(partition, start_ms),
            self.keys.usage_open(partition),
            self.keys.usage_done(partition),
            self.keys.outbox(partition),
            self.keys.usage_window(partition, carry_start),
        ]
        args = [
            str(now_ms),
            str(start_ms),
            str(end_ms),
            str(carry_start),
            str(carry_end),
            str(self.done_retention_ms),
            "finish" if pairs is None else "pairs",
            str(len(pairs or [])),
        ]
        for customer, metric in pairs or []:
            keys.append(self.keys.keys.customer(customer))
            args += [customer, metric]
        for customer, metric in pairs or []:
            keys += history_keys(self.keys.keys, customer, metric)
        reply = await self.storage.run(Script("report", tuple(keys), tuple(args)))
        return [str(x) for x in reply]


@dataclass(slots=True)
class PeriodCloser:
    """Emits `period.closed` for assets whose period ended with no admission after it."""

    storage: AsyncStorage
    keys: WorkerKeys
    metric_types: Mapping[str, str]
    """Metric name -> type (CumulativeCounter, ...), from the config."""
    grace_ms: int = 30_000
    """A period is closed this long after its end, so late admissions still count in it."""

    async def run(self, partition: int, now_ms: int, limit: int = 100) -> int:
        """Close every due period of a partition's assets; return events emitted."""
        client = self.storage.client
        due = await _read(
            client.zrangebyscore(
                self.keys.closing(partition), "-inf", now_ms - self.grace_ms, start=0, num=limit
            )
        )
        closed = 0
        for member in due:
            customer, _, metric = str(member).partition(_US)
            if await self.close(partition, customer, metric, now_ms):
                closed += 1
        return closed

    async def close(self, partition: int, customer: str, metric: str, now_ms: int) -> bool:
        """Close one asset's ended period unless it was closed already; True if emitted now."""
        core: Keys = self.keys.keys
        akey, _ = core.asset(customer, metric)
        seen = await _read(self.storage.client.hget(akey, "ps"))
        kind = _KIND.get(self.metric_types.get(metric, ""), "C")
        reply = await self.storage.run(
            Script(
                "close",
                (
                    self.keys.closing(partition),
                    self.keys.outbox(partition),
                    core.customer(customer),
                    akey,
                ),
                (str(now_ms), customer, metric, str(seen or "-1"), kind, str(self.grace_ms)),
            )
        )
        return bool(reply[0] == "closed")
