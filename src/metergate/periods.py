"""Billing period windows: half-open ``[start, end)`` spans of epoch seconds.

A period boundary is defined as a wall-clock time in an IANA timezone (derived from the
entitlement's anchor, or from the calendar when there is none) and converted to UTC epoch
seconds. The conversion rule is: a boundary is the *first instant whose local wall-clock time is
at or after the nominal wall-clock time*. That single rule covers every DST case:

- a normal wall-clock time maps to its only instant;
- an ambiguous one (fall-back overlap) maps to its first occurrence;
- a non-existent one (spring-forward gap) maps to the first instant after the gap.

Because nominal boundaries strictly increase, that rule makes the epoch boundaries
non-decreasing, so windows always tile. A boundary can collapse onto the next one when a whole
period's wall-clock span is skipped (Pacific/Apia skipped 2011-12-30); such empty windows contain
no instant and are never returned.

Everything here is pure: the current time is always passed in.
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["PERIOD_NAMES", "Period", "period_seconds", "period_window"]

Period = Literal["day", "week", "month", "year"]
PERIOD_NAMES: tuple[str, ...] = ("day", "week", "month", "year")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_SECOND = timedelta(seconds=1)


@dataclass(frozen=True, slots=True)
class _Anchor:
    """Wall-clock fields of an anchor that define where periods start."""

    month: int
    day: int
    weekday: int
    time_of_day: time


# Without an anchor the calendar applies: midnight, Monday, the 1st, January 1st.
_CALENDAR_ANCHOR = _Anchor(month=1, day=1, weekday=0, time_of_day=time(0, 0))


def period_window(
    period: Period,
    at: float,
    *,
    anchor: datetime | None = None,
    timezone: str = "UTC",
) -> tuple[int, int]:
    """Return the half-open window [start, end) of epoch seconds of the period containing `at`."""
    tz = _zone(timezone)
    fields = _anchor_fields(anchor, tz)
    nominal = _nominal_boundary(period, fields)
    instant = _whole_seconds(at)
    try:
        # Boundaries are whole seconds, so flooring `at` preserves `start <= at < end`.
        local = _local_wall(instant, tz)
        index = _index_guess(period, local, fields)
        cache: dict[int, int] = {}

        def boundary(k: int) -> int:
            if k not in cache:
                cache[k] = _to_epoch(nominal(k), tz)
            return cache[k]

        # The guess is the period starting on or before the local date, so it is off by at most
        # one step (anchor time of day later than `at`'s), plus any empty windows left by a
        # skipped calendar day; stepping is never proportional to the anchor's distance.
        while boundary(index) > instant:
            index -= 1
        while boundary(index + 1) <= instant:
            index += 1
        return boundary(index), boundary(index + 1)
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"instant {at!r} is outside the supported date range") from exc


def period_seconds(
    period: Period,
    at: float,
    *,
    anchor: datetime | None = None,
    timezone: str = "UTC",
) -> int:
    """Return the length in seconds of the window containing `at`."""
    start, end = period_window(period, at, anchor=anchor, timezone=timezone)
    return end - start


def _zone(timezone: str) -> ZoneInfo:
    """Load an IANA timezone, turning every lookup failure into ValueError."""
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # ZoneInfo reports malformed keys, missing keys and non-TZif files differently; callers
        # only need to know the configured name is unusable.
        raise ValueError(f"unknown timezone {timezone!r}") from exc


def _whole_seconds(at: float) -> int:
    """Floor an epoch instant to whole seconds, rejecting NaN and infinities."""
    if not math.isfinite(at):
        raise ValueError(f"instant must be a finite number of epoch seconds, got {at!r}")
    return math.floor(at)


def _anchor_fields(anchor: datetime | None, tz: ZoneInfo) -> _Anchor:
    """Extract the wall-clock fields of `anchor` as seen in `tz`."""
    if anchor is None:
        return _CALENDAR_ANCHOR
    if anchor.tzinfo is not None and anchor.utcoffset() is not None:
        anchor = anchor.astimezone(tz)
    # Sub-second precision is dropped because windows are whole epoch seconds.
    return _Anchor(
        month=anchor.month,
        day=anchor.day,
        weekday=anchor.weekday(),
        time_of_day=anchor.time().replace(microsecond=0, tzinfo=None, fold=0),
    )


def _nominal_boundary(period: str, anchor: _Anchor) -> Callable[[int], datetime]:
    """Return a map from period index to the naive wall-clock start of that period."""
    at_time = anchor.time_of_day
    if period == "day":
        # Index: proleptic Gregorian ordinal of the start date.
        return lambda k: datetime.combine(date.fromordinal(k), at_time)
    if period == "week":
        # Ordinal 1 (0001-01-01) is a Monday, so ordinals congruent to 1 + weekday (mod 7)
        # fall on the anchor's weekday; index k is the k-th such date.
        return lambda k: datetime.combine(date.fromordinal(7 * k + 1 + anchor.weekday), at_time)
    if period == "month":
        # Index: months since year 0, so the clamped day is recomputed per month from the
        # anchor itself, which is what keeps Jan 31 -> Feb 28 -> Mar 31 from drifting.
        def month_start(k: int) -> datetime:
            year, month0 = divmod(k, 12)
            return _clamped(year, month0 + 1, anchor.day, at_time)

        return month_start
    if period == "year":
        return lambda k: _clamped(k, anchor.month, anchor.day, at_time)
    raise ValueError(f"unknown period {period!r}; expected one of {', '.join(PERIOD_NAMES)}")


def _index_guess(period: str, local: datetime, anchor: _Anchor) -> int:
    """Return the index of the last period whose nominal start date is on or before `local`."""
    if period == "day":
        return local.toordinal()
    if period == "week":
        return (local.toordinal() - 1 - anchor.weekday) // 7
    if period == "month":
        return local.year * 12 + local.month - 1
    return local.year


def _clamped(year: int, month: int, day: int, at_time: time) -> datetime:
    """Build a wall-clock datetime, clamping `day` to the month's last day."""
    last = calendar.monthrange(year, month)[1]
    return datetime.combine(date(year, month, min(day, last)), at_time)


def _local_wall(instant: int, tz: ZoneInfo) -> datetime:
    """Return the naive wall-clock time in `tz` of an epoch instant."""
    # Arithmetic from the epoch avoids the platform's localtime() range limits.
    return (_EPOCH + timedelta(seconds=instant)).astimezone(tz).replace(tzinfo=None)


def _to_epoch(wall: datetime, tz: ZoneInfo) -> int:
    """Return the first epoch second whose wall-clock time in `tz` is at or after `wall`."""
    earliest = (wall.replace(tzinfo=tz, fold=0) - _EPOCH) // _ONE_SECOND
    if _local_wall(earliest, tz) == wall:
        # fold=0 is the first occurrence of an ambiguous time and the only one otherwise.
        return earliest
    # `wall` falls in a gap. fold=0 lands past the gap (pre-transition offset) and fold=1 lands
    # before it, so the transition instant lies between them; bisect for it.
    other = (wall.replace(tzinfo=tz, fold=1) - _EPOCH) // _ONE_SECOND
    low, high = min(earliest, other), max(earliest, other)
    while high - low > 1:
        middle = (low + high) // 2
        if _local_wall(middle, tz) >= wall:
            high = middle
        else:
            low = middle
    return high
