"""Tests for billing period windows (metergate.periods)."""

from __future__ import annotations

import calendar
import functools
import math
from datetime import UTC, date, datetime, time, timedelta
from datetime import timezone as fixed_timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metergate.periods import PERIOD_NAMES, Period, period_seconds, period_window

HOUR = 3600
DAY = 24 * HOUR
WEEK = 7 * DAY

PERIODS: tuple[Period, ...] = ("day", "week", "month", "year")
ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "Pacific/Apia",
)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """Epoch seconds of a UTC wall-clock time."""
    return calendar.timegm((year, month, day, hour, minute, second))


def local(tz: str, year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    """Epoch seconds of an (existing, unambiguous) wall-clock time in `tz`."""
    return int(datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(tz)).timestamp())


def walk(period: Period, at: float, count: int, anchor: datetime | None = None) -> list[int]:
    """Start of the window containing `at` followed by `count` successive window ends."""
    start, end = period_window(period, at, anchor=anchor)
    starts = [start]
    for _ in range(count):
        starts.append(end)
        _, end = period_window(period, end, anchor=anchor)
    return starts


# --- explicit examples -------------------------------------------------------------------------


def test_calendar_month_in_utc() -> None:
    """Without an anchor a UTC month runs from the 1st 00:00 to the next 1st 00:00."""
    at = utc(2024, 2, 15, 13, 45)
    assert period_window("month", at) == (utc(2024, 2, 1), utc(2024, 3, 1))
    assert period_seconds("month", at) == 29 * DAY


def test_calendar_day_and_year_in_utc() -> None:
    """Without an anchor a UTC day starts at midnight and a year on January 1st."""
    at = utc(2023, 7, 4, 12)
    assert period_window("day", at) == (utc(2023, 7, 4), utc(2023, 7, 5))
    assert period_window("year", at) == (utc(2023, 1, 1), utc(2024, 1, 1))


@pytest.mark.parametrize(
    ("year", "february_start"),
    [(2028, date(2028, 2, 29)), (2027, date(2027, 2, 28))],
)
def test_jan31_anchor_clamps_without_drift(year: int, february_start: date) -> None:
    """A Jan-31 monthly anchor starts on the last day of short months and returns to the 31st."""
    anchor = datetime(2020, 1, 31, 9, 30)
    starts = walk("month", utc(year, 1, 31, 12), 4, anchor=anchor)
    expected = [
        date(year, 1, 31),
        february_start,
        date(year, 3, 31),
        date(year, 4, 30),
        date(year, 5, 31),
    ]
    assert starts == [utc(d.year, d.month, d.day, 9, 30) for d in expected]


def test_jan31_anchor_window_in_february() -> None:
    """An instant in late February of a common year falls in the window Feb 28 .. Mar 31."""
    anchor = datetime(2020, 1, 31)
    assert period_window("month", utc(2027, 2, 28, 1), anchor=anchor) == (
        utc(2027, 2, 28),
        utc(2027, 3, 31),
    )
    assert period_window("month", utc(2027, 2, 27, 23), anchor=anchor) == (
        utc(2027, 1, 31),
        utc(2027, 2, 28),
    )


def test_feb29_yearly_anchor_in_common_years() -> None:
    """A Feb-29 yearly anchor starts on Feb 28 in common years and on Feb 29 in leap years."""
    anchor = datetime(2024, 2, 29, 10)
    assert period_window("year", utc(2025, 6, 1), anchor=anchor) == (
        utc(2025, 2, 28, 10),
        utc(2026, 2, 28, 10),
    )
    assert period_window("year", utc(2027, 12, 31), anchor=anchor) == (
        utc(2027, 2, 28, 10),
        utc(2028, 2, 29, 10),
    )
    assert period_window("year", utc(2028, 2, 29, 9), anchor=anchor) == (
        utc(2027, 2, 28, 10),
        utc(2028, 2, 29, 10),
    )


def test_week_starts_on_monday_by_default() -> None:
    """Without an anchor a week runs from Monday 00:00 to the next Monday 00:00."""
    wednesday = utc(2024, 5, 15, 12)
    assert period_window("week", wednesday) == (utc(2024, 5, 13), utc(2024, 5, 20))
    assert period_window("week", utc(2024, 5, 13)) == (utc(2024, 5, 13), utc(2024, 5, 20))


def test_week_follows_anchor_weekday_and_time() -> None:
    """An anchored week starts on the anchor's weekday at the anchor's time of day."""
    thursday_anchor = datetime(2023, 6, 1, 18)
    assert period_window("week", utc(2024, 5, 15, 12), anchor=thursday_anchor) == (
        utc(2024, 5, 9, 18),
        utc(2024, 5, 16, 18),
    )


def test_day_follows_anchor_time_of_day() -> None:
    """An anchored day starts every day at the anchor's wall-clock time."""
    anchor = datetime(2022, 3, 3, 17, 5, 9)
    assert period_window("day", utc(2024, 1, 10, 8), anchor=anchor) == (
        utc(2024, 1, 9, 17, 5, 9),
        utc(2024, 1, 10, 17, 5, 9),
    )


def test_berlin_day_is_23_hours_on_spring_forward() -> None:
    """The Berlin calendar day of the March DST change lasts 23 hours."""
    at = utc(2024, 3, 31, 12)
    window = period_window("day", at, timezone="Europe/Berlin")
    assert window == (utc(2024, 3, 30, 23), utc(2024, 3, 31, 22))
    assert period_seconds("day", at, timezone="Europe/Berlin") == 23 * HOUR


def test_berlin_day_is_25_hours_on_fall_back() -> None:
    """The Berlin calendar day of the October DST change lasts 25 hours."""
    at = utc(2024, 10, 27, 12)
    window = period_window("day", at, timezone="Europe/Berlin")
    assert window == (utc(2024, 10, 26, 22), utc(2024, 10, 27, 23))
    assert period_seconds("day", at, timezone="Europe/Berlin") == 25 * HOUR


def test_boundary_in_spring_forward_gap_moves_to_end_of_gap() -> None:
    """A boundary at a non-existent wall time (02:30 in the gap) starts when the gap ends."""
    anchor = datetime(2020, 1, 1, 2, 30)
    tz = "Europe/Berlin"
    # 03:00 CEST is 01:00 UTC: the first instant after the 02:00-03:00 gap.
    assert period_window("day", utc(2024, 3, 31, 12), anchor=anchor, timezone=tz) == (
        utc(2024, 3, 31, 1),
        utc(2024, 4, 1, 0, 30),
    )
    assert period_window("day", utc(2024, 3, 31, 0), anchor=anchor, timezone=tz) == (
        utc(2024, 3, 30, 1, 30),
        utc(2024, 3, 31, 1),
    )


def test_boundary_in_fall_back_overlap_uses_first_occurrence() -> None:
    """A boundary at an ambiguous wall time (02:30 on fall-back) uses its first occurrence."""
    anchor = datetime(2020, 1, 1, 2, 30)
    tz = "Europe/Berlin"
    # 02:30 CEST (the first 02:30) is 00:30 UTC; the second 02:30 CET would be 01:30 UTC.
    assert period_window("day", utc(2024, 10, 27, 1), anchor=anchor, timezone=tz) == (
        utc(2024, 10, 27, 0, 30),
        utc(2024, 10, 28, 1, 30),
    )


def test_new_york_calendar_day_and_month() -> None:
    """New York calendar periods start at local midnight, across the DST change in March."""
    tz = "America/New_York"
    assert period_window("day", utc(2024, 3, 10, 12), timezone=tz) == (
        utc(2024, 3, 10, 5),
        utc(2024, 3, 11, 4),
    )
    assert period_window("month", utc(2024, 3, 20), timezone=tz) == (
        utc(2024, 3, 1, 5),
        utc(2024, 4, 1, 4),
    )
    assert period_seconds("day", utc(2024, 11, 3, 12), timezone=tz) == 25 * HOUR


def test_kolkata_half_hour_offset() -> None:
    """Kolkata periods start at local midnight, which is 18:30 UTC the previous day."""
    tz = "Asia/Kolkata"
    assert period_window("day", utc(2024, 1, 1, 18, 29), timezone=tz) == (
        utc(2023, 12, 31, 18, 30),
        utc(2024, 1, 1, 18, 30),
    )
    assert period_window("day", utc(2024, 1, 1, 18, 30), timezone=tz) == (
        utc(2024, 1, 1, 18, 30),
        utc(2024, 1, 2, 18, 30),
    )
    assert period_window("year", utc(2024, 6, 1), timezone=tz) == (
        utc(2023, 12, 31, 18, 30),
        utc(2024, 12, 31, 18, 30),
    )


def test_lord_howe_half_hour_dst() -> None:
    """Lord Howe Island's 30-minute DST change makes its day 23.5 or 24.5 hours long."""
    tz = "Australia/Lord_Howe"
    assert period_seconds("day", utc(2024, 10, 6, 3), timezone=tz) == 23 * HOUR + 1800
    assert period_seconds("day", utc(2024, 4, 7, 3), timezone=tz) == 24 * HOUR + 1800


def test_apia_skipped_day_yields_no_empty_window() -> None:
    """Samoa skipped 2011-12-30, so the window before the jump ends where the next one starts."""
    tz = "Pacific/Apia"
    jump = utc(2011, 12, 30, 10)
    assert period_window("day", jump - 1, timezone=tz) == (utc(2011, 12, 29, 10), jump)
    assert period_window("day", jump, timezone=tz) == (jump, jump + DAY)


def test_anchor_in_the_future() -> None:
    """An anchor later than the instant still aligns the window that contains the instant."""
    anchor = datetime(2030, 6, 15, 8)
    assert period_window("month", utc(2024, 3, 20), anchor=anchor) == (
        utc(2024, 3, 15, 8),
        utc(2024, 4, 15, 8),
    )
    assert period_window("year", utc(2024, 3, 20), anchor=anchor) == (
        utc(2023, 6, 15, 8),
        utc(2024, 6, 15, 8),
    )


def test_instant_at_boundary_belongs_to_new_period() -> None:
    """Windows are half-open: the boundary instant starts the new period."""
    boundary = utc(2024, 3, 1)
    assert period_window("month", boundary) == (boundary, utc(2024, 4, 1))
    assert period_window("month", boundary - 0.001) == (utc(2024, 2, 1), boundary)


def test_fractional_instant_uses_whole_second_boundaries() -> None:
    """A fractional instant gets integer boundaries that contain it."""
    start, end = period_window("day", utc(2024, 1, 1) + 0.5)
    assert (start, end) == (utc(2024, 1, 1), utc(2024, 1, 2))
    assert isinstance(start, int)
    assert isinstance(end, int)


def test_aware_anchor_is_converted_into_timezone() -> None:
    """An aware anchor is read as wall-clock time in the period's timezone."""
    # 2024-01-31 23:30 UTC is 2024-02-01 00:30 in Berlin, so months start on the 1st at 00:30.
    anchor = datetime(2024, 1, 31, 23, 30, tzinfo=UTC)
    tz = "Europe/Berlin"
    assert period_window("month", utc(2024, 6, 10), anchor=anchor, timezone=tz) == (
        local(tz, 2024, 6, 1, 0, 30),
        local(tz, 2024, 7, 1, 0, 30),
    )


def test_naive_anchor_is_wall_clock_in_timezone() -> None:
    """A naive anchor is wall-clock time in the period's timezone, not UTC."""
    anchor = datetime(2024, 1, 31, 23, 30)
    tz = "Europe/Berlin"
    assert period_window("month", utc(2024, 6, 10), anchor=anchor, timezone=tz) == (
        local(tz, 2024, 5, 31, 23, 30),
        local(tz, 2024, 6, 30, 23, 30),
    )


def test_anchor_sub_second_precision_is_ignored() -> None:
    """Microseconds in the anchor are dropped so boundaries stay on whole seconds."""
    anchor = datetime(2024, 1, 1, 6, 0, 0, 999_999)
    assert period_window("day", utc(2024, 5, 5, 7), anchor=anchor) == (
        utc(2024, 5, 5, 6),
        utc(2024, 5, 6, 6),
    )


def test_unknown_period_raises_value_error() -> None:
    """An unknown period name is rejected with ValueError naming it."""
    with pytest.raises(ValueError, match="unknown period 'hour'"):
        period_window("hour", 0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "", "../etc/passwd", "Europe", "zone.tab"])
def test_unknown_timezone_raises_value_error(name: str) -> None:
    """An unknown or malformed timezone name is rejected with ValueError naming it."""
    with pytest.raises(ValueError, match="unknown timezone"):
        period_window("day", 0.0, timezone=name)


@pytest.mark.parametrize("at", [math.nan, math.inf, -math.inf])
def test_non_finite_instant_raises_value_error(at: float) -> None:
    """NaN and infinite instants are rejected with ValueError."""
    with pytest.raises(ValueError, match="finite"):
        period_window("day", at)


def test_instant_beyond_supported_range_raises_value_error() -> None:
    """An instant whose window would leave the datetime range raises ValueError."""
    with pytest.raises(ValueError, match="outside the supported date range"):
        period_window("year", 1e15)


def test_period_names_match_period_literal() -> None:
    """PERIOD_NAMES lists every period the function accepts."""
    assert PERIOD_NAMES == PERIODS
    for name in PERIODS:
        start, end = period_window(name, 1e9)
        assert start <= 1e9 < end


# --- reference implementation ------------------------------------------------------------------


def ref_wall(instant: int, tz: ZoneInfo) -> datetime:
    """Naive wall-clock time of an epoch second in `tz`."""
    return datetime.fromtimestamp(instant, tz).replace(tzinfo=None)


def ref_offset(instant: int, tz: ZoneInfo) -> int:
    """UTC offset in seconds of `tz` at an epoch second."""
    offset = datetime.fromtimestamp(instant, tz).utcoffset()
    assert offset is not None
    return int(offset.total_seconds())


def ref_to_epoch(wall: datetime, tz: ZoneInfo) -> int:
    """First epoch second whose wall-clock time is at or after `wall`."""
    as_if_utc = calendar.timegm(wall.timetuple())
    offsets = {ref_offset(as_if_utc + h * HOUR, tz) for h in range(-36, 37, 2)}
    # The wall time exists: its first occurrence is the earliest exact match.
    matches = [as_if_utc - o for o in offsets if ref_wall(as_if_utc - o, tz) == wall]
    if matches:
        return min(matches)
    # The wall time is in a gap: scan forward from a second whose wall time is surely earlier
    # (every nearby offset is <= max(offsets)), by minutes and then by seconds.
    instant = as_if_utc - max(offsets) - 60
    while ref_wall(instant, tz) < wall:
        instant += 60
    instant -= 60
    while ref_wall(instant, tz) < wall:
        instant += 1
    return instant


def ref_window(
    period: Period, at: float, anchor: datetime | None, timezone: str
) -> tuple[int, int]:
    """Window from all nominal boundaries near `at`, each built straight from the anchor."""
    tz = ZoneInfo(timezone)
    if anchor is None:
        month, day, weekday, at_time = 1, 1, 0, time(0)
    else:
        if anchor.tzinfo is not None:
            anchor = anchor.astimezone(tz).replace(tzinfo=None)
        month, day, weekday = anchor.month, anchor.day, anchor.weekday()
        at_time = anchor.time().replace(microsecond=0)
    here = ref_wall(math.floor(at), tz)

    def clamped(year: int, month: int) -> date:
        return date(year, month, min(day, calendar.monthrange(year, month)[1]))

    dates: list[date]
    if period == "day":
        dates = [here.date() + timedelta(days=d) for d in range(-3, 4)]
    elif period == "week":
        dates = [here.date() + timedelta(days=d) for d in range(-21, 22)]
        dates = [d for d in dates if d.weekday() == weekday]
    elif period == "month":
        dates = []
        for step in range(-2, 3):
            y, m0 = divmod(here.year * 12 + here.month - 1 + step, 12)
            dates.append(clamped(y, m0 + 1))
    else:
        dates = [clamped(here.year + step, month) for step in range(-2, 3)]
    boundaries = [ref_to_epoch(datetime.combine(d, at_time), tz) for d in dates]
    return max(b for b in boundaries if b <= at), min(b for b in boundaries if b > at)


@functools.cache
def transitions(timezone: str) -> tuple[int, ...]:
    """Exact epoch seconds at which `timezone` changed its UTC offset in 2000-2100."""
    tz = ZoneInfo(timezone)

    def offset(instant: int) -> timedelta | None:
        return datetime.fromtimestamp(instant, tz).utcoffset()

    found = []
    for instant in range(utc(2000, 1, 1), utc(2100, 1, 1), WEEK):
        if offset(instant) != offset(instant + WEEK):
            # These zones change offset at most once a week; bisect for the new offset's start.
            low, high = instant, instant + WEEK
            while high - low > 1:
                middle = (low + high) // 2
                if offset(middle) == offset(low):
                    low = middle
                else:
                    high = middle
            found.append(high)
    return tuple(found)


MIN_AT = utc(2000, 1, 1)
MAX_AT = utc(2100, 1, 1)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Period, float, datetime | None, str]:
    """A period, an instant, an anchor and a timezone, often clustered around DST changes."""
    period = draw(st.sampled_from(PERIODS))
    timezone = draw(st.sampled_from(ZONES))
    tz = ZoneInfo(timezone)
    changes = transitions(timezone)
    near_change = bool(changes) and draw(st.booleans())
    if near_change:
        change = draw(st.sampled_from(changes))
        spread = draw(st.sampled_from([2 * DAY, 45 * DAY]))
        at: float = change + draw(st.integers(-spread, spread))
    else:
        at = draw(st.integers(MIN_AT, MAX_AT))
    at += draw(st.sampled_from([0.0, 0.0, 0.5, 0.999]))
    kind = draw(st.sampled_from(["none", "naive", "aware", "at-change"]))
    anchor: datetime | None
    if kind == "none":
        anchor = None
    elif kind == "at-change" and near_change:
        # Wall-clock times just around a change land in gaps and overlaps on that date.
        wall = ref_wall(change - 1, tz)
        anchor = wall + timedelta(minutes=draw(st.integers(-90, 90)))
    elif kind == "aware":
        anchor = draw(
            st.datetimes(
                min_value=datetime(1990, 1, 1),
                max_value=datetime(2110, 12, 31),
                timezones=st.sampled_from(
                    [UTC, ZoneInfo("Europe/Berlin"), fixed_timezone(timedelta(hours=-9.5))]
                ),
            )
        )
    else:
        day_of_month = draw(st.sampled_from([1, 15, 28, 29, 30, 31]) | st.integers(1, 31))
        year = draw(st.integers(1990, 2110))
        month = draw(st.integers(1, 12))
        day_of_month = min(day_of_month, calendar.monthrange(year, month)[1])
        clock = draw(
            st.sampled_from([time(0), time(2, 30), time(1, 59, 59), time(23, 59, 59)]) | st.times()
        )
        anchor = datetime.combine(date(year, month, day_of_month), clock)
    return period, at, anchor, timezone


@settings(max_examples=300, deadline=None)
@given(cases())
def test_window_matches_reference(case: tuple[Period, float, datetime | None, str]) -> None:
    """The window contains the instant and equals the brute-force reference window."""
    period, at, anchor, timezone = case
    start, end = period_window(period, at, anchor=anchor, timezone=timezone)
    assert start <= at < end
    assert (start, end) == ref_window(period, at, anchor, timezone)


@settings(max_examples=300, deadline=None)
@given(cases())
def test_consecutive_windows_tile(case: tuple[Period, float, datetime | None, str]) -> None:
    """Each window's end starts the next window and its start ends the previous one."""
    period, at, anchor, timezone = case

    def window(instant: float) -> tuple[int, int]:
        return period_window(period, instant, anchor=anchor, timezone=timezone)

    start, end = window(at)
    assert window(end)[0] == end
    assert window(start - 1)[1] == start
    assert window(start) == (start, end)
    assert window(end - 1) == (start, end)
    assert period_seconds(period, at, anchor=anchor, timezone=timezone) == end - start


@settings(max_examples=100, deadline=None)
@given(cases())
def test_walk_of_fourteen_windows_matches_reference(
    case: tuple[Period, float, datetime | None, str],
) -> None:
    """Fourteen consecutive windows each equal the reference, so clamping never drifts."""
    period, at, anchor, timezone = case
    for _ in range(14):
        start, end = period_window(period, at, anchor=anchor, timezone=timezone)
        assert (start, end) == ref_window(period, start, anchor, timezone)
        at = end
