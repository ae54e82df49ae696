"""Period rollover in storage: month ends, leap years, DST and timezones reset usage and level."""

from __future__ import annotations

import calendar
import json
from datetime import datetime
from typing import Any

import pytest

from metergate import Meter

HOUR = 3_600
DAY = 24 * HOUR


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """Epoch seconds of a UTC wall-clock time."""
    return calendar.timegm((year, month, day, hour, minute, second))


LADDER = [
    {"from": 0, "level": "Normal", "policy": "NotifyOnly"},
    {"from": 5, "level": "Warning", "policy": "NotifyOnly"},
    {"from": 8, "level": "OverUsage", "policy": "Deny"},
]


def config(
    period: str = "month",
    *,
    kind: str = "CumulativeCounter",
    tiers: list[dict[str, Any]] | None = None,
    entitlement: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One metric `m` on plan `p` (Deny past 8, Warning past 5) for customer `c`."""
    return {
        "metrics": {"m": {"type": kind}},
        "plans": {"p": {"assets": {"m": {"period": period, "tiers": tiers or LADDER}}}},
        "customers": {"c": {"entitlement": entitlement or {"plan": "p"}}},
    }


def level_changes(meter: Meter, customer: str = "c") -> list[dict[str, Any]]:
    """The customer's `quota.level_changed` event data, in order."""
    stream = meter.core.keys.outbox(meter.core.keys.partition(customer))
    return [
        json.loads(fields["data"])
        for _id, fields in meter.storage.client.xrange(stream)
        if fields["customer"] == customer and fields["type"] == "quota.level_changed"
    ]


def window(meter: Meter) -> tuple[Any, Any]:
    """The (period_start, period_end) the usage read reports."""
    usage = meter.usage("c", "m")
    return usage["period_start"], usage["period_end"]


def fill_and_cross(meter: Meter, clock: Any, boundary: int) -> None:
    """Fill the period 1 s before `boundary`, check the refusal waits 1 s, then step onto it."""
    clock.now = boundary - 1
    filled = meter.admit("c", {"m": meter.usage("c", "m")["remaining"]})
    assert (filled.allowed, filled.assets["m"].value) == (True, 8)
    refused = meter.admit("c", {"m": 1})
    assert (refused.status, refused.problem, refused.retry_after) == (429, "quota-exceeded", 1)
    clock.now = boundary
    fresh = meter.admit("c", {"m": 1})
    assert (fresh.allowed, fresh.assets["m"].value, fresh.level) == (True, 1, "Normal")
    assert fresh.assets["m"].period_start == boundary


def test_month_end_resets_usage_and_level_without_an_event(make_meter: Any, clock: Any) -> None:
    """At the month end value and level restart at 0 and Normal, silently; crossings fire again."""
    meter = make_meter(config())
    fill_and_cross(meter, clock, utc(2027, 2, 1))
    assert window(meter) == (utc(2027, 2, 1), utc(2027, 3, 1))
    assert [(e["to_level"], e["period_start"]) for e in level_changes(meter)] == [
        ("Warning", "2027-01-01T00:00:00Z")
    ]
    assert meter.admit("c", {"m": 5}).level == "Warning"
    assert [
        (e["from_level"], e["to_level"], e["value"], e["period_start"], e["period_end"])
        for e in level_changes(meter)
    ][1:] == [("Normal", "Warning", 6, "2027-02-01T00:00:00Z", "2027-03-01T00:00:00Z")]


def test_usage_read_shows_a_new_period_before_any_admission(make_meter: Any, clock: Any) -> None:
    """A usage read after the period end shows 0 and Normal before any admission in the new one."""
    meter = make_meter(config())
    assert meter.admit("c", {"m": 7}).level == "Warning"
    clock.now = utc(2027, 2, 1)
    usage = meter.usage("c", "m")
    assert (usage["value"], usage["level"], usage["remaining"]) == (0, "Normal", 8)
    assert (usage["period_start"], usage["period_end"]) == (utc(2027, 2, 1), utc(2027, 3, 1))


@pytest.mark.parametrize(("year", "february_day"), [(2028, 29), (2027, 28)])
def test_anchor_on_january_31st_clamps_to_the_end_of_february(
    make_meter: Any, clock: Any, year: int, february_day: int
) -> None:
    """Anchored on Jan 31, periods start Jan 31, Feb 28 (29 in a leap year), Mar 31, Apr 30."""
    anchor = {"plan": "p", "anchor": f"{year}-01-31T00:00:00"}
    meter = make_meter(config(entitlement=anchor))
    clock.now = utc(year, 2, 10)
    assert window(meter) == (utc(year, 1, 31), utc(year, 2, february_day))
    fill_and_cross(meter, clock, utc(year, 2, february_day))
    assert window(meter) == (utc(year, 2, february_day), utc(year, 3, 31))
    fill_and_cross(meter, clock, utc(year, 3, 31))
    assert window(meter) == (utc(year, 3, 31), utc(year, 4, 30))


def test_yearly_anchor_on_february_29th_starts_on_the_28th_in_common_years(
    make_meter: Any, clock: Any
) -> None:
    """A yearly period anchored on Feb 29 2028 rolls over on Feb 28 2029."""
    meter = make_meter(config("year", entitlement={"plan": "p", "anchor": "2028-02-29T00:00:00"}))
    clock.now = utc(2028, 6, 1)
    assert window(meter) == (utc(2028, 2, 29), utc(2029, 2, 28))
    fill_and_cross(meter, clock, utc(2029, 2, 28))
    assert window(meter) == (utc(2029, 2, 28), utc(2030, 2, 28))


def test_daily_period_on_the_spring_dst_change_is_23_hours(make_meter: Any, clock: Any) -> None:
    """In Europe/Berlin the day of the spring DST change runs 23 hours, midnight to midnight."""
    meter = make_meter(config("day", entitlement={"plan": "p", "timezone": "Europe/Berlin"}))
    clock.now = utc(2027, 3, 28, 0, 30)
    assert window(meter) == (utc(2027, 3, 27, 23), utc(2027, 3, 28, 22))
    assert meter.admit("c", {"m": 8}).allowed
    assert meter.admit("c", {"m": 1}).retry_after == 21 * HOUR + 30 * 60
    fill_and_cross(meter, clock, utc(2027, 3, 28, 22))
    assert window(meter) == (utc(2027, 3, 28, 22), utc(2027, 3, 29, 22))


def test_daily_period_on_the_autumn_dst_change_is_25_hours(make_meter: Any, clock: Any) -> None:
    """In Europe/Berlin, the day of the autumn DST change runs 25 hours."""
    meter = make_meter(config("day", entitlement={"plan": "p", "timezone": "Europe/Berlin"}))
    clock.now = utc(2027, 10, 30, 22)
    assert window(meter) == (utc(2027, 10, 30, 22), utc(2027, 10, 31, 23))
    assert meter.admit("c", {"m": 8}).allowed
    assert meter.admit("c", {"m": 1}).retry_after == 25 * HOUR
    fill_and_cross(meter, clock, utc(2027, 10, 31, 23))


def test_monthly_period_in_new_york_follows_local_midnight_across_dst(
    make_meter: Any, clock: Any
) -> None:
    """A calendar month in America/New_York starts at local midnight: 05:00Z or 04:00Z (DST)."""
    meter = make_meter(config(entitlement={"plan": "p", "timezone": "America/New_York"}))
    clock.now = utc(2027, 3, 15)
    assert window(meter) == (utc(2027, 3, 1, 5), utc(2027, 4, 1, 4))
    fill_and_cross(meter, clock, utc(2027, 4, 1, 4))
    assert window(meter) == (utc(2027, 4, 1, 4), utc(2027, 5, 1, 4))


def test_weekly_calendar_period_starts_on_monday(make_meter: Any, clock: Any) -> None:
    """Without an anchor a week runs from Monday 00:00 to the next Monday in the timezone."""
    meter = make_meter(config("week"))
    assert window(meter) == (utc(2027, 1, 11), utc(2027, 1, 18))
    assert meter.admit("c", {"m": 8}).allowed
    assert meter.admit("c", {"m": 1}).retry_after == 2 * DAY + 16 * HOUR
    fill_and_cross(meter, clock, utc(2027, 1, 18))


def test_set_entitlement_sets_the_anchor_and_timezone(make_meter: Any, clock: Any) -> None:
    """`set_entitlement` with an anchor and timezone moves periods to the anchor's wall time."""
    meter = make_meter(config())
    meter.set_entitlement("c", "p", anchor=datetime(2027, 1, 15, 9, 30), timezone="Asia/Kolkata")
    assert window(meter) == (utc(2027, 1, 15, 4), utc(2027, 2, 15, 4))
    assert meter.admit("c", {"m": 8}).allowed
    refused = meter.admit("c", {"m": 1})
    assert refused.retry_after == utc(2027, 2, 15, 4) - utc(2027, 1, 15, 8)
    fill_and_cross(meter, clock, utc(2027, 2, 15, 4))


def test_a_plan_change_takes_effect_at_once_and_keeps_the_period_usage(make_meter: Any) -> None:
    """A plan change applies the new tiers on every gateway's next admission and keeps the value."""
    cfg = config()
    cfg["plans"]["q"] = {
        "assets": {
            "m": {
                "period": "month",
                "tiers": [{"from": 0, "level": "Normal", "policy": "NotifyOnly"}],
            }
        }
    }
    gateway, admin = make_meter(cfg), make_meter(cfg)
    assert gateway.admit("c", {"m": 8}).allowed
    assert gateway.admit("c", {"m": 1}).problem == "quota-exceeded"
    admin.set_entitlement("c", "q")
    upgraded = gateway.admit("c", {"m": 1})
    assert (upgraded.allowed, upgraded.assets["m"].value, upgraded.assets["m"].limit) == (
        True,
        9,
        None,
    )


def test_total_counter_keeps_its_last_total_across_the_period_end(
    make_meter: Any, clock: Any
) -> None:
    """A TotalCounter's new period counts only the increase over the last total of the old one."""
    meter = make_meter(config(kind="TotalCounter", tiers=LADDER[:1]))
    assert meter.record("c", "m", 100).assets["m"].value == 100
    clock.now = utc(2027, 2, 1)
    assert meter.record("c", "m", 130).assets["m"].value == 30


def test_gauge_with_a_period_keeps_its_reading_across_the_period_end(
    make_meter: Any, clock: Any
) -> None:
    """A Gauge's period only windows its peak: the reading and its level survive the period end."""
    meter = make_meter(config(kind="Gauge"))
    assert meter.record("c", "m", 7).level == "Warning"
    clock.now = utc(2027, 2, 1)
    usage = meter.usage("c", "m")
    assert (usage["value"], usage["level"]) == (7, "Warning")
    assert meter.record("c", "m", 6).level == "Warning"
    assert len(level_changes(meter)) == 1


def test_first_admission_of_a_period_jumping_tiers_reports_from_normal(
    make_meter: Any, clock: Any
) -> None:
    """A new period's first admission landing past a tier emits one change from Normal."""
    meter = make_meter(
        config(tiers=[*LADDER[:2], {"from": 8, "level": "OverUsage", "policy": "NotifyOnly"}])
    )
    assert meter.admit("c", {"m": 9}).level == "OverUsage"
    clock.now = utc(2027, 2, 1)
    assert meter.admit("c", {"m": 6}).level == "Warning"
    assert [(e["from_level"], e["to_level"], e["value"]) for e in level_changes(meter)] == [
        ("Normal", "OverUsage", 9),
        ("Normal", "Warning", 6),
    ]


def test_first_unit_entering_a_first_tier_above_normal_emits_nothing(
    make_meter: Any, clock: Any
) -> None:
    """When the first tier is not Normal, the first unit of a period still emits no level change."""
    tiers = [
        {"from": 0, "level": "Warning", "policy": "NotifyOnly"},
        {"from": 5, "level": "OverUsage", "policy": "NotifyOnly"},
    ]
    meter = make_meter(config(tiers=tiers))
    assert meter.admit("c", {"m": 1}).level == "Warning"
    assert meter.admit("c", {"m": 5}).level == "OverUsage"
    clock.now = utc(2027, 2, 1)
    assert meter.admit("c", {"m": 1}).level == "Warning"
    assert [(e["from_level"], e["to_level"], e["value"]) for e in level_changes(meter)] == [
        ("Warning", "OverUsage", 6)
    ]


def test_a_lagging_gateway_clock_never_reopens_a_closed_period(make_meter: Any, clock: Any) -> None:
    """A gateway whose clock is still in the old period adds to the new period, never resets it."""
    meter = make_meter(config())
    assert meter.admit("c", {"m": 8}).allowed
    clock.now = utc(2027, 2, 1)
    assert meter.admit("c", {"m": 2}).assets["m"].value == 2

    class Lagging:
        def __call__(self) -> float:
            return utc(2027, 2, 1) - 1

    lagging = make_meter(config(), clock=Lagging())
    assert lagging.admit("c", {"m": 1}).assets["m"].value == 3
    assert meter.usage("c", "m")["value"] == 3
