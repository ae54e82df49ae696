"""Usage over time, for the dashboard: per asset, units per hour and per UTC day.

The report script (lua/report.lua) adds each reported window's units to two small hashes of
the asset, one bucket per hour (the last 48 kept) and one per UTC day (the last 62 kept), so a
day's period and a month's can each be drawn next to the previous one. Usage still in an open
report window is read from the window itself, so the history is current before the worker runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metergate.core.errors import NotFound
from metergate.core.flows import Batch, Flow, MeterCore
from metergate.core.keys import Keys
from metergate.periods import period_window

__all__ = ["DAY_MS", "HOUR_MS", "Series", "history_keys", "usage_series"]

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
OPEN_WINDOWS_READ = 100
"""Open report windows read per partition: more pile up only while no worker runs."""


def history_keys(keys: Keys, customer: str, metric: str) -> tuple[str, str]:
    """Return the hourly and the daily usage history hash of one asset (in its customer's slot)."""
    stem, _ = keys.asset(customer, metric)
    return stem + ":hh", stem + ":hd"


@dataclass(frozen=True, slots=True)
class Series:
    """An asset's units per bucket over its current and previous period (epoch ms)."""

    bucket_ms: int
    current: tuple[int, int]
    previous: tuple[int, int]
    units: dict[int, int]
    """Bucket start (epoch ms) -> units added in it."""

    def cumulative(self, start: int, end: int) -> list[tuple[int, int]]:
        """Return (bucket start, running total) for every bucket of [start, end) with usage."""
        total, out = 0, []
        for at in sorted(b for b in self.units if start - self.bucket_ms < b < end):
            total += self.units[at]
            out.append((at, total))
        return out


def usage_series(core: MeterCore, customer: str, metric: str) -> Flow[Series | None]:
    """Return a counter asset's usage per bucket over its current and previous period.

    None for an asset without a period (Gauge, UpDownCounter): it has no usage to add up.
    Buckets are hours for periods up to two days long, UTC days otherwise; a bucket belongs to
    the period its start is in (a period starting mid-day in its timezone shares that day)."""
    yield from core.bootstrap()
    ent = yield from core.entitlement(customer)
    if ent is None:
        raise NotFound(f"customer '{customer}' does not exist")
    asset = core.plans[ent.plan].get(metric)
    if asset is None:
        raise NotFound(f"plan '{ent.plan}' has no configuration for metric '{metric}'")
    if asset.period is None or asset.kind not in "CT":
        return None
    now = core.clock()
    ps, pe = period_window(asset.period, now, anchor=ent.anchor, timezone=ent.timezone)  # type: ignore[arg-type]
    qs, _ = period_window(asset.period, ps - 1, anchor=ent.anchor, timezone=ent.timezone)  # type: ignore[arg-type]
    hourly, daily = history_keys(core.keys, customer, metric)
    bucket_ms = HOUR_MS if pe - ps <= 2 * 86_400 else DAY_MS
    partition = core.keys.partition(customer)
    stored, windows = yield Batch(
        (
            ("HGETALL", hourly if bucket_ms == HOUR_MS else daily),
            (
                "ZRANGE",
                core.keys.usage_open(partition),
                "0",
                str(OPEN_WINDOWS_READ - 1),
                "REV",
            ),
        )
    )
    units: dict[int, int] = {}
    for field, value in _pairs(stored):
        if field != "lo":
            units[int(field) * bucket_ms] = int(value)
    if windows:
        pair = "q\x1f" + customer + "\x1f" + metric
        open_units = yield Batch(
            tuple(("HGET", core.keys.usage_window(partition, int(w)), pair) for w in windows)
        )
        for window, value in zip(windows, open_units, strict=True):
            if value is not None:
                at = int(window) - int(window) % bucket_ms
                units[at] = units.get(at, 0) + int(value)
    return Series(bucket_ms, (ps * 1000, pe * 1000), (qs * 1000, ps * 1000), units)


def _pairs(reply: Any) -> list[tuple[str, str]]:
    """HGETALL answers a dict (redis-py) or a flat list (some drivers): read both."""
    if isinstance(reply, dict):
        return [(str(k), str(v)) for k, v in reply.items()]
    flat = list(reply or [])
    return [(str(k), str(v)) for k, v in zip(flat[::2], flat[1::2], strict=True)]
