"""How each metric type aggregates: counters, running totals, gauges, up-down counters, leases."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.builders import asset, customer, gateway, metric, plan, tier

from metergate import InvalidAmount, Meter


def config(kind: str, tiers: list[dict[str, Any]], period: str | None = None) -> dict[str, Any]:
    """A config with one metric `m` of type `kind` on plan `p`, customer `c`."""
    return gateway(
        metrics={"m": metric(kind)},
        plans={"p": plan(m=asset(tier(0), *tiers, period=period))},
        customers={"c": customer("p")},
    )


def events(meter: Meter, customer: str = "c") -> list[dict[str, Any]]:
    """The customer's outbox events in order, as {'type': ..., **data}."""
    stream = meter.core.keys.outbox(meter.core.keys.partition(customer))
    return [
        {"type": fields["type"], **json.loads(fields["data"])}
        for _id, fields in meter.storage.client.xrange(stream)
        if fields["customer"] == customer
    ]


def value(meter: Meter) -> Any:
    """The asset's current value as the usage read shows it."""
    return meter.usage("c", "m")["value"]


# -- CumulativeCounter --------------------------------------------------------------------------


def test_cumulative_counter_sums_admissions_and_records(make_meter: Any) -> None:
    """A CumulativeCounter's value is the sum of the amounts admitted and recorded in the period."""
    meter = make_meter(config("CumulativeCounter", [], period="month"))
    assert meter.admit("c", {"m": 3}).assets["m"].value == 3
    assert meter.admit("c", {"m": 4}).assets["m"].value == 7
    assert meter.record("c", "m", 5).assets["m"].value == 12
    assert meter.record("c", "m", 0).assets["m"].value == 12
    assert value(meter) == 12


def test_cumulative_counter_record_follows_the_policies(make_meter: Any) -> None:
    """A counter recorded through `record` is refused by a Deny tier like an admission."""
    meter = make_meter(config("CumulativeCounter", [tier(10, "OverUsage", "Deny")], period="month"))
    assert meter.record("c", "m", 10).allowed
    refused = meter.record("c", "m", 1)
    assert (refused.status, refused.problem, refused.assets["m"].value) == (
        429,
        "quota-exceeded",
        10,
    )
    assert value(meter) == 10


def test_amounts_must_be_non_negative_integers(make_meter: Any) -> None:
    """Floats, booleans and negative amounts are rejected before anything is stored."""
    meter = make_meter(config("CumulativeCounter", [], period="month"))
    for bad in (1.0, True, -1, 2**53):
        with pytest.raises(InvalidAmount):
            meter.admit("c", {"m": bad})
        with pytest.raises(InvalidAmount):
            meter.record("c", "m", bad)
    assert value(meter) == 0


# -- TotalCounter -------------------------------------------------------------------------------


def test_total_counter_adds_deltas_and_treats_a_lower_total_as_a_reset(make_meter: Any) -> None:
    """Each total adds its increase over the previous one, or itself when it is lower (a reset)."""
    meter = make_meter(config("TotalCounter", [], period="month"))
    values = [meter.record("c", "m", total).assets["m"].value for total in (10, 25, 25, 7, 9, 0, 4)]
    assert values == [10, 25, 25, 32, 34, 34, 38]
    assert value(meter) == 38


def test_total_counter_reports_are_facts_never_refused(make_meter: Any) -> None:
    """A TotalCounter report past a Deny `from` is stored, never refused, and emits its change."""
    meter = make_meter(config("TotalCounter", [tier(30, "OverUsage", "Deny")], period="month"))
    assert meter.record("c", "m", 20).allowed
    over = meter.record("c", "m", 100)
    assert (over.allowed, over.status, over.assets["m"].value, over.level) == (
        True,
        200,
        100,
        "OverUsage",
    )
    assert meter.admit("c", {"m": 1}).problem == "quota-exceeded"
    assert [(e["type"], e["to_level"], e["policy"], e["value"]) for e in events(meter)] == [
        ("quota.level_changed", "OverUsage", "Deny", 100)
    ]


def test_total_counter_report_crossing_suspend_usage_suspends(make_meter: Any) -> None:
    """A TotalCounter report crossing a SuspendUsage `from` is recorded and suspends the asset."""
    meter = make_meter(
        config("TotalCounter", [tier(50, "OverUsage", "SuspendUsage")], period="month")
    )
    decision = meter.record("c", "m", 60)
    assert (decision.status, decision.assets["m"].value, decision.assets["m"].suspended) == (
        200,
        60,
        True,
    )
    assert meter.record("c", "m", 70).assets["m"].value == 70
    assert [e["type"] for e in events(meter)] == ["asset.suspended", "quota.level_changed"]


# -- Gauge --------------------------------------------------------------------------------------


def seats() -> dict[str, Any]:
    """A Gauge `m`: Critical past 40, SuspendUsage past 50."""
    return config(
        "Gauge", [tier(40, "Critical", "NotifyOnly"), tier(50, "OverUsage", "SuspendUsage")]
    )


def test_gauge_record_sets_the_reading(make_meter: Any) -> None:
    """A Gauge's value is its latest reading, up or down, never a sum."""
    meter = make_meter(seats())
    assert [meter.record("c", "m", v).assets["m"].value for v in (5, 3, 8, 0, 12)] == [
        5,
        3,
        8,
        0,
        12,
    ]
    assert value(meter) == 12


def test_gauge_record_is_never_refused_and_applies_suspend_usage(make_meter: Any) -> None:
    """A Gauge reading past SuspendUsage is stored, suspends the asset, emits; later ones land."""
    meter = make_meter(seats())
    assert meter.record("c", "m", 45).level == "Critical"
    crossing = meter.record("c", "m", 55)
    assert (crossing.allowed, crossing.status, crossing.level) == (True, 200, "OverUsage")
    assert (crossing.assets["m"].value, crossing.assets["m"].suspended) == (55, True)
    assert meter.admit("c", {"m": 0}).problem == "asset-suspended"
    lower = meter.record("c", "m", 30)
    assert (lower.status, lower.assets["m"].value, lower.level) == (200, 30, "Normal")
    assert events(meter) == [
        {
            "type": "quota.level_changed",
            "customer": "c",
            "metric": "m",
            "from_level": "Normal",
            "to_level": "Critical",
            "policy": "NotifyOnly",
            "value": 45,
            "threshold": 40,
            "period_start": None,
            "period_end": None,
            "seq": 1,
        },
        {
            "type": "asset.suspended",
            "customer": "c",
            "metric": "m",
            "reason": "SuspendUsage",
            "seq": 2,
        },
        {
            "type": "quota.level_changed",
            "customer": "c",
            "metric": "m",
            "from_level": "Critical",
            "to_level": "OverUsage",
            "policy": "SuspendUsage",
            "value": 55,
            "threshold": 50,
            "period_start": None,
            "period_end": None,
            "seq": 3,
        },
        {
            "type": "quota.level_changed",
            "customer": "c",
            "metric": "m",
            "from_level": "OverUsage",
            "to_level": "Normal",
            "policy": "NotifyOnly",
            "value": 30,
            "threshold": 0,
            "period_start": None,
            "period_end": None,
            "seq": 4,
        },
    ]
    assert meter.usage("c", "m")["suspended"] is True


def test_gauge_admit_checks_reading_plus_amount_and_records_nothing(make_meter: Any) -> None:
    """A Gauge admission checks reading + amount against a Deny `from`, never sets the reading."""
    meter = make_meter(config("Gauge", [tier(50, "OverUsage", "Deny")]))
    meter.record("c", "m", 40)
    fits = meter.admit("c", {"m": 10})
    assert (fits.allowed, fits.assets["m"].value) == (True, 40)
    assert meter.admit("c", {"m": 10}).allowed
    refused = meter.admit("c", {"m": 11})
    assert (refused.status, refused.problem, refused.retry_after) == (429, "quota-exceeded", None)
    meter.record("c", "m", 50)
    assert meter.admit("c", {"m": 1}).problem == "quota-exceeded"
    assert meter.admit("c", {"m": 0}).allowed
    assert value(meter) == 50
    assert events(meter) == []


def test_gauge_admit_crossing_suspend_usage_is_refused_and_suspends(make_meter: Any) -> None:
    """A Gauge admission whose reading + amount would cross SuspendUsage is 403 and suspends."""
    meter = make_meter(seats())
    meter.record("c", "m", 50)
    refused = meter.admit("c", {"m": 1})
    assert (refused.status, refused.problem, refused.assets["m"].value) == (
        403,
        "asset-suspended",
        50,
    )
    assert meter.usage("c", "m")["suspended"] is True


# -- UpDownCounter ------------------------------------------------------------------------------


def concurrency() -> dict[str, Any]:
    """An UpDownCounter `m` allowing at most 2 in flight."""
    return config("UpDownCounter", [tier(1, "Warning", "NotifyOnly"), tier(2, "OverUsage", "Deny")])


def test_up_down_admit_takes_a_lease_that_settle_ends(make_meter: Any) -> None:
    """An UpDownCounter admission counts until `settle` ends its lease; full: 429, Retry-After 1."""
    meter = make_meter(concurrency())
    first = meter.admit("c", {"m": 1})
    second = meter.admit("c", {"m": 1})
    assert (first.assets["m"].value, second.assets["m"].value) == (1, 2)
    assert first.ticket is not None and second.ticket is not None
    assert first.ticket.leased == {"m": 1}
    refused = meter.admit("c", {"m": 1})
    assert (refused.status, refused.problem, refused.retry_after) == (429, "quota-exceeded", 1)
    ended = meter.settle(first.ticket)
    assert (ended.status, ended.assets["m"].value) == (200, 1)
    assert meter.settle(first.ticket).assets["m"].value == 1
    assert meter.admit("c", {"m": 1}).allowed
    assert value(meter) == 2
    assert [(e["from_level"], e["to_level"], e["value"]) for e in events(meter)] == [
        ("Normal", "Warning", 2),
        ("Warning", "Normal", 1),
        ("Normal", "Warning", 2),
    ]


def test_up_down_leases_expire_once_after_lease_ttl(make_meter: Any, clock: Any) -> None:
    """A lease stops counting once lease_ttl_s has passed; ending it later subtracts nothing."""
    meter = make_meter(concurrency())
    first = meter.admit("c", {"m": 2}, lease_ttl_s=10)
    assert first.ticket is not None
    clock.advance(9)
    assert value(meter) == 2
    assert meter.admit("c", {"m": 1}).problem == "quota-exceeded"
    clock.advance(1)
    assert value(meter) == 0
    later = meter.admit("c", {"m": 1}, lease_ttl_s=60)
    assert (later.allowed, later.assets["m"].value) == (True, 1)
    assert meter.settle(first.ticket).assets["m"].value == 1
    assert value(meter) == 1
    clock.advance(3600)
    assert value(meter) == 0
    assert meter.admit("c", {"m": 0}).assets["m"].value == 0


def test_up_down_record_applies_signed_deltas(make_meter: Any) -> None:
    """`record` on an UpDownCounter adds signed deltas to the running value."""
    meter = make_meter(config("UpDownCounter", [tier(2, "OverUsage", "Deny")]))
    values = [meter.record("c", "m", delta).assets["m"].value for delta in (2, -1, -1, 1)]
    assert values == [2, 1, 0, 1]
    refused = meter.record("c", "m", 2)
    assert (refused.status, refused.problem, refused.retry_after) == (429, "quota-exceeded", 1)
    assert value(meter) == 1


def test_up_down_counter_is_never_reset_by_a_period(make_meter: Any, clock: Any) -> None:
    """An UpDownCounter's value carries over month and year ends."""
    meter = make_meter(config("UpDownCounter", []))
    meter.record("c", "m", 7)
    clock.advance(400 * 86_400)
    assert value(meter) == 7
    assert meter.admit("c", {"m": 1}, lease_ttl_s=60).assets["m"].value == 8
    usage = meter.usage("c", "m")
    assert (usage["period_start"], usage["period_end"], usage["limit"]) == (None, None, None)


def test_only_counters_can_be_estimated(make_meter: Any) -> None:
    """Estimates on a Gauge or an UpDownCounter are rejected: only counters are settled later."""
    meter = make_meter(concurrency())
    with pytest.raises(InvalidAmount):
        meter.admit("c", {}, estimates={"m": 1})
    assert value(meter) == 0
