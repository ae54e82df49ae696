"""Each policy at its boundary, level events, multi-asset atomicity and settlement of estimates."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.builders import asset, counters, customer, gateway, plan, tier

from metergate import Meter, NotFound, Throttle

# The clock fixture stands at 2027-01-15T08:00:00Z; the calendar month ends 2027-02-01T00:00:00Z.
TO_MONTH_END = 16 * 86_400 + 16 * 3_600
JANUARY = ("2027-01-01T00:00:00Z", "2027-02-01T00:00:00Z")


def single_asset(
    tiers: list[dict[str, Any]], *, balance: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A config with one monthly CumulativeCounter `calls` on plan `p` and customer `c`."""
    calls = asset(*tiers, period="month", balance=None if balance is None else "credits")
    return gateway(
        metrics=counters("calls"),
        plans={"p": plan(calls=calls)},
        customers={"c": customer("p", credits=balance)},
    )


def events(meter: Meter, customer: str = "c", etype: str | None = None) -> list[dict[str, Any]]:
    """The customer's outbox events in order, as {'type': ..., **data}."""
    stream = meter.core.keys.outbox(meter.core.keys.partition(customer))
    out = []
    for _id, fields in meter.storage.client.xrange(stream):
        if fields["customer"] == customer and etype in (None, fields["type"]):
            out.append({"type": fields["type"], **json.loads(fields["data"])})
    return out


# -- Deny ---------------------------------------------------------------------------------------


def test_deny_admits_exactly_from_units_then_refuses_until_period_end(make_meter: Any) -> None:
    """A Deny tier at 10 admits units 1 to 10, refuses the 11th: 429, Retry-After to period end."""
    meter = make_meter(
        single_asset([tier(0, "Normal", "NotifyOnly"), tier(10, "OverUsage", "Deny")])
    )
    for expected in range(1, 11):
        decision = meter.admit("c", {"calls": 1})
        assert (decision.allowed, decision.status, decision.problem) == (True, 200, None)
        assert decision.assets["calls"].value == expected
    refused = meter.admit("c", {"calls": 1})
    assert (refused.allowed, refused.status, refused.problem) == (False, 429, "quota-exceeded")
    assert refused.retry_after == TO_MONTH_END
    assert refused.metric == "calls"
    assert refused.ticket is None
    assert refused.assets["calls"].value == 10
    assert refused.refused_by == ("OverUsage", "Deny")
    assert meter.usage("c", "calls") == {
        "value": 10,
        "pending": 0,
        "level": "Normal",
        "policy": "NotifyOnly",
        "period_start": 1_798_761_600,
        "period_end": 1_801_440_000,
        "limit": 10,
        "remaining": 0,
        "overage": 0,
        "suspended": False,
    }


def test_deny_refuses_a_batch_that_would_cross_and_admits_one_that_fits(make_meter: Any) -> None:
    """An admission of several units is refused whole when it would cross a Deny `from`."""
    meter = make_meter(
        single_asset([tier(0, "Normal", "NotifyOnly"), tier(10, "OverUsage", "Deny")])
    )
    assert meter.admit("c", {"calls": 8}).allowed
    refused = meter.admit("c", {"calls": 3})
    assert (refused.status, refused.problem, refused.assets["calls"].value) == (
        429,
        "quota-exceeded",
        8,
    )
    fits = meter.admit("c", {"calls": 2})
    assert (fits.status, fits.assets["calls"].value, fits.assets["calls"].remaining) == (200, 10, 0)
    assert meter.admit("c", {"calls": 0}).allowed
    assert events(meter) == []


def test_deny_retry_after_counts_down_with_the_clock(make_meter: Any, clock: Any) -> None:
    """Retry-After of a Deny refusal is the whole seconds left to the period end, rounded up."""
    meter = make_meter(
        single_asset([tier(0, "Normal", "NotifyOnly"), tier(1, "OverUsage", "Deny")])
    )
    assert meter.admit("c", {"calls": 1}).allowed
    clock.now = 1_801_440_000 - 2.5
    assert meter.admit("c", {"calls": 1}).retry_after == 3
    clock.now = 1_801_440_000 - 1
    assert meter.admit("c", {"calls": 1}).retry_after == 1
    clock.now = 1_801_440_000
    assert meter.admit("c", {"calls": 1}).allowed


# -- AllowWithGrace -----------------------------------------------------------------------------


def test_grace_allows_until_from_plus_grace_then_refuses(make_meter: Any) -> None:
    """AllowWithGrace at 10 with grace 5 admits up to 15 units and refuses the 16th with 429."""
    meter = make_meter(
        single_asset(
            [tier(0, "Normal", "NotifyOnly"), tier(10, "OverUsage", "AllowWithGrace", grace=5)]
        )
    )
    assert meter.admit("c", {"calls": 10}).level == "Normal"
    inside = meter.admit("c", {"calls": 1})
    assert (inside.allowed, inside.level, inside.assets["calls"].policy) == (
        True,
        "OverUsage",
        "AllowWithGrace",
    )
    assert (inside.assets["calls"].limit, inside.assets["calls"].remaining) == (15, 4)
    assert meter.admit("c", {"calls": 4}).assets["calls"].value == 15
    refused = meter.admit("c", {"calls": 1})
    assert (refused.status, refused.problem, refused.retry_after) == (
        429,
        "quota-exceeded",
        TO_MONTH_END,
    )
    assert refused.refused_by == ("OverUsage", "AllowWithGrace")
    assert meter.usage("c", "calls")["value"] == 15


# -- RateLimit ----------------------------------------------------------------------------------


def rate_limited() -> dict[str, Any]:
    """Normal up to 3 units, then at most 4 units per minute (one every 15 s, burst 4)."""
    return single_asset(
        [
            tier(0, "Normal", "NotifyOnly"),
            tier(3, "Critical", "RateLimit", rate={"limit": 4, "per": "1m"}),
        ]
    )


def test_rate_limit_bursts_limit_units_then_one_per_interval(make_meter: Any, clock: Any) -> None:
    """A RateLimit tier passes `limit` units at once, then refuses with the exact Retry-After."""
    meter = make_meter(rate_limited())
    assert meter.admit("c", {"calls": 3}).assets["calls"].throttle is None
    for remaining in (3, 2, 1, 0):
        decision = meter.admit("c", {"calls": 1})
        assert decision.allowed
        assert decision.assets["calls"].throttle == Throttle(4, 60, remaining)
    refused = meter.admit("c", {"calls": 1})
    assert (refused.status, refused.problem, refused.retry_after) == (429, "rate-limited", 15)
    assert refused.assets["calls"].value == 7
    clock.advance(14)
    assert meter.admit("c", {"calls": 1}).retry_after == 1
    clock.advance(1)
    again = meter.admit("c", {"calls": 1})
    assert (again.allowed, again.assets["calls"].value) == (True, 8)
    assert meter.admit("c", {"calls": 1}).retry_after == 15
    clock.advance(60)
    assert meter.admit("c", {"calls": 4}).allowed
    assert meter.admit("c", {"calls": 1}).retry_after == 15


def test_rate_limit_counts_only_the_units_inside_the_tier(make_meter: Any) -> None:
    """Units below the RateLimit tier's `from` do not spend the throttle; the ones inside it do."""
    meter = make_meter(rate_limited())
    crossing = meter.admit("c", {"calls": 7})
    assert (crossing.allowed, crossing.assets["calls"].throttle) == (True, Throttle(4, 60, 0))
    refused = meter.admit("c", {"calls": 1})
    assert (refused.problem, refused.retry_after) == ("rate-limited", 15)


def test_rate_limit_refuses_more_than_its_burst_without_retry_after(make_meter: Any) -> None:
    """An admission larger than `rate.limit` can never pass, so its refusal has no Retry-After."""
    meter = make_meter(rate_limited())
    assert meter.admit("c", {"calls": 3}).allowed
    refused = meter.admit("c", {"calls": 5})
    assert (refused.status, refused.problem, refused.retry_after) == (429, "rate-limited", None)
    assert meter.admit("c", {"calls": 4}).allowed


# -- SuspendUsage -------------------------------------------------------------------------------


def suspending() -> dict[str, Any]:
    """Normal up to 5 units; the admission that would pass 5 suspends the asset."""
    return single_asset([tier(0, "Normal", "NotifyOnly"), tier(5, "OverUsage", "SuspendUsage")])


def test_suspend_usage_crossing_is_refused_unrecorded_and_suspends(make_meter: Any) -> None:
    """Crossing SuspendUsage is 403, records no units, suspends the asset, emits asset.suspended."""
    meter = make_meter(suspending())
    assert meter.admit("c", {"calls": 5}).allowed
    crossing = meter.admit("c", {"calls": 2})
    assert (crossing.allowed, crossing.status, crossing.problem) == (False, 403, "asset-suspended")
    assert (crossing.metric, crossing.retry_after) == ("calls", None)
    assert (crossing.assets["calls"].value, crossing.assets["calls"].suspended) == (5, True)
    assert events(meter) == [
        {
            "type": "asset.suspended",
            "customer": "c",
            "metric": "calls",
            "reason": "SuspendUsage",
            "seq": 1,
        }
    ]
    later = meter.admit("c", {"calls": 0})
    assert (later.status, later.problem) == (403, "asset-suspended")
    usage = meter.usage("c", "calls")
    assert (usage["value"], usage["suspended"], usage["level"]) == (5, True, "Normal")
    assert len(events(meter)) == 1


def test_suspension_survives_a_new_period_until_resumed(make_meter: Any, clock: Any) -> None:
    """A new period does not lift a SuspendUsage suspension; `resume_asset` does, once."""
    meter = make_meter(suspending())
    assert meter.admit("c", {"calls": 6}).problem == "asset-suspended"
    clock.now = 1_801_440_000
    refused = meter.admit("c", {"calls": 1})
    assert (refused.status, refused.problem) == (403, "asset-suspended")
    assert meter.usage("c", "calls")["value"] == 0
    resumed = meter.resume_asset("c", "calls")
    assert (resumed.suspended, resumed.value) == (False, 0)
    meter.resume_asset("c", "calls")
    admitted = meter.admit("c", {"calls": 5})
    assert (admitted.status, admitted.assets["calls"].value) == (200, 5)
    assert [(e["type"], e["reason"]) for e in events(meter)] == [
        ("asset.suspended", "SuspendUsage"),
        ("asset.resumed", "admin"),
    ]


def test_admin_suspend_and_resume_gate_admissions(make_meter: Any) -> None:
    """`suspend_asset` refuses every admission with 403 until `resume_asset`; each emits once."""
    meter = make_meter(single_asset([tier(0, "Normal", "NotifyOnly")]))
    assert meter.admit("c", {"calls": 2}).allowed
    suspended = meter.suspend_asset("c", "calls")
    assert (suspended.suspended, suspended.value) == (True, 2)
    meter.suspend_asset("c", "calls")
    refused = meter.admit("c", {"calls": 1})
    assert (refused.allowed, refused.status, refused.problem) == (False, 403, "asset-suspended")
    assert meter.usage("c", "calls")["suspended"] is True
    meter.resume_asset("c", "calls")
    assert meter.admit("c", {"calls": 1}).assets["calls"].value == 3
    assert events(meter) == [
        {
            "type": "asset.suspended",
            "customer": "c",
            "metric": "calls",
            "reason": "admin",
            "seq": 1,
        },
        {"type": "asset.resumed", "customer": "c", "metric": "calls", "reason": "admin", "seq": 2},
    ]


def test_admin_suspend_of_a_metric_outside_the_plan_changes_nothing(make_meter: Any) -> None:
    """Suspending a metric outside the customer's plan raises NotFound and changes nothing."""
    config = single_asset([tier(0, "Normal", "NotifyOnly")])
    config["metrics"]["other"] = {"type": "CumulativeCounter"}
    meter = make_meter(config)
    with pytest.raises(NotFound):
        meter.suspend_asset("c", "other")
    with pytest.raises(NotFound):
        meter.suspend_asset("nobody", "calls")
    assert events(meter) == []


# -- AllowWithOverage ---------------------------------------------------------------------------


def test_allow_with_overage_counts_the_units_beyond_from(make_meter: Any) -> None:
    """AllowWithOverage admits past its `from` and counts every unit beyond it as overage."""
    meter = make_meter(
        single_asset([tier(0, "Normal", "NotifyOnly"), tier(10, "OverUsage", "AllowWithOverage")])
    )
    assert meter.admit("c", {"calls": 8}).assets["calls"].overage == 0
    over = meter.admit("c", {"calls": 5})
    assert (over.allowed, over.level, over.assets["calls"].overage) == (True, "OverUsage", 3)
    assert meter.admit("c", {"calls": 2}).assets["calls"].overage == 5
    usage = meter.usage("c", "calls")
    assert (usage["value"], usage["overage"], usage["limit"], usage["remaining"]) == (
        15,
        5,
        None,
        None,
    )


def test_allow_with_overage_prices_overage_at_its_tier_with_base_once(make_meter: Any) -> None:
    """Overage units are charged at their tier's price, plus the tier's base once per period."""
    meter = make_meter(
        single_asset(
            [
                tier(0, "Normal", "NotifyOnly", price={"per_unit": 1}),
                tier(10, "OverUsage", "AllowWithOverage", price={"per_unit": 2, "base": 5}),
            ],
            balance={"amount": 100},
        )
    )
    assert meter.admit("c", {"calls": 8}).balances == {"credits": 92}
    assert meter.admit("c", {"calls": 5}).balances == {"credits": 92 - 2 - 3 * 2 - 5}
    assert meter.admit("c", {"calls": 2}).balances == {"credits": 79 - 4}
    assert meter.balance("c", "credits").amount == 75
    assert [(e["delta"], e.get("count")) for e in meter.ledger("c")] == [(-25, 3), (100, None)]


# -- NotifyOnly and quota.level_changed ---------------------------------------------------------


def notify_ladder() -> dict[str, Any]:
    """NotifyOnly tiers at 0 (Normal), 5 (Warning), 8 (Critical) and 10 (OverUsage)."""
    return single_asset(
        [
            tier(0, "Normal", "NotifyOnly"),
            tier(5, "Warning", "NotifyOnly"),
            tier(8, "Critical", "NotifyOnly"),
            tier(10, "OverUsage", "NotifyOnly"),
        ]
    )


def test_notify_only_always_admits_and_reports_the_level(make_meter: Any) -> None:
    """NotifyOnly never refuses; the decision's level is the highest tier the value has entered."""
    meter = make_meter(notify_ladder())
    levels = [meter.admit("c", {"calls": 1}).level for _ in range(12)]
    assert levels == ["Normal"] * 5 + ["Warning"] * 3 + ["Critical"] * 2 + ["OverUsage"] * 2
    assert meter.usage("c", "calls")["level"] == "OverUsage"


def test_level_changed_fires_once_per_crossing_with_its_data(make_meter: Any) -> None:
    """`quota.level_changed` fires once per change with the SPEC 5 data; a jump is one event."""
    meter = make_meter(notify_ladder())
    for _ in range(7):
        meter.admit("c", {"calls": 1})
    meter.admit("c", {"calls": 4})
    meter.admit("c", {"calls": 1})
    assert events(meter, etype="quota.level_changed") == [
        {
            "type": "quota.level_changed",
            "customer": "c",
            "metric": "calls",
            "from_level": "Normal",
            "to_level": "Warning",
            "policy": "NotifyOnly",
            "value": 6,
            "threshold": 5,
            "period_start": JANUARY[0],
            "period_end": JANUARY[1],
            "seq": 1,
        },
        {
            "type": "quota.level_changed",
            "customer": "c",
            "metric": "calls",
            "from_level": "Warning",
            "to_level": "OverUsage",
            "policy": "NotifyOnly",
            "value": 11,
            "threshold": 10,
            "period_start": JANUARY[0],
            "period_end": JANUARY[1],
            "seq": 2,
        },
    ]


def test_level_changed_names_the_policy_of_the_tier_entered(make_meter: Any) -> None:
    """The event's `policy` is the policy name of the tier entered, not an internal code."""
    meter = make_meter(
        single_asset(
            [
                tier(0, "Normal", "NotifyOnly"),
                tier(2, "Warning", "AllowWithGrace", grace=2),
                tier(6, "OverUsage", "Deny"),
            ]
        )
    )
    meter.admit("c", {"calls": 3})
    assert meter.admit("c", {"calls": 4}).problem == "quota-exceeded"
    meter.admit("c", {"calls": 1})
    changes = events(meter, etype="quota.level_changed")
    assert [(e["to_level"], e["policy"], e["value"], e["threshold"]) for e in changes] == [
        ("Warning", "AllowWithGrace", 3, 2)
    ]


def test_refused_admissions_emit_no_level_change(make_meter: Any) -> None:
    """A refused admission records nothing, so it never emits `quota.level_changed`."""
    meter = make_meter(
        single_asset(
            [
                tier(0, "Normal", "NotifyOnly"),
                tier(3, "Warning", "NotifyOnly"),
                tier(4, "OverUsage", "Deny"),
            ]
        )
    )
    assert meter.admit("c", {"calls": 3}).allowed
    assert meter.admit("c", {"calls": 2}).problem == "quota-exceeded"
    assert events(meter) == []


# -- several assets in one admission -------------------------------------------------------------


def two_assets() -> dict[str, Any]:
    """`calls` (priced, rate limited past 2) and `tokens` (Deny past 5), both drawing `credits`."""
    calls = asset(
        tier(0, "Normal", "NotifyOnly", price={"per_unit": 1}),
        tier(2, "Warning", "RateLimit", rate={"limit": 2, "per": 60}, price={"per_unit": 1}),
        period="month",
        balance="credits",
    )
    tokens = asset(tier(0, "Normal", "NotifyOnly"), tier(5, "OverUsage", "Deny"), period="month")
    return gateway(
        metrics=counters("calls", "tokens"),
        plans={"p": plan(calls=calls, tokens=tokens)},
        customers={"c": customer("p", credits=50)},
    )


def test_multi_asset_admission_is_all_or_nothing(make_meter: Any) -> None:
    """When the second of two assets is refused, neither is recorded: units, charge, throttle."""
    meter = make_meter(two_assets())
    first = meter.admit("c", {"calls": 3, "tokens": 4})
    assert (first.allowed, first.balances) == (True, {"credits": 47})
    assert first.assets["calls"].throttle == Throttle(2, 60, 1)
    events_before = events(meter)
    refused = meter.admit("c", {"calls": 1, "tokens": 2})
    assert (refused.status, refused.problem, refused.metric) == (429, "quota-exceeded", "tokens")
    assert (refused.assets["calls"].value, refused.assets["tokens"].value) == (3, 4)
    assert refused.assets["calls"].throttle == Throttle(2, 60, 1)
    assert meter.usage("c", "calls")["value"] == 3
    assert meter.usage("c", "tokens")["value"] == 4
    assert meter.balance("c", "credits").amount == 47
    assert events(meter) == events_before
    # The refused admission did not spend the throttle: its last unit still passes.
    second = meter.admit("c", {"calls": 1, "tokens": 1})
    assert (second.allowed, second.assets["calls"].value, second.balances) == (
        True,
        4,
        {"credits": 46},
    )
    assert second.assets["calls"].throttle == Throttle(2, 60, 0)


def test_multi_asset_refusal_of_the_first_asset_records_neither(make_meter: Any) -> None:
    """When the first asset is refused the second is not recorded; the refusal names the first."""
    meter = make_meter(two_assets())
    assert meter.admit("c", {"calls": 4}).allowed
    refused = meter.admit("c", {"calls": 1, "tokens": 1})
    assert (refused.status, refused.problem, refused.metric, refused.retry_after) == (
        429,
        "rate-limited",
        "calls",
        30,
    )
    assert meter.usage("c", "tokens")["value"] == 0


def test_multi_asset_suspend_crossing_is_not_recorded_when_another_asset_refuses(
    make_meter: Any,
) -> None:
    """A SuspendUsage crossing in an admission another asset refuses anyway suspends nothing."""
    config = two_assets()
    config["plans"]["p"]["assets"]["calls"]["tiers"] = [
        tier(0, "Normal", "NotifyOnly", price={"per_unit": 1}),
        tier(1, "OverUsage", "SuspendUsage", price={"per_unit": 1}),
    ]
    meter = make_meter(config)
    assert meter.admit("c", {"calls": 1, "tokens": 5}).allowed
    for amounts in ({"calls": 1, "tokens": 1}, {"tokens": 1, "calls": 1}):
        refused = meter.admit("c", amounts)
        assert (refused.status, refused.problem, refused.metric) == (
            429,
            "quota-exceeded",
            "tokens",
        )
        assert refused.assets["calls"].suspended is False
    assert meter.usage("c", "calls")["suspended"] is False
    crossing = meter.admit("c", {"calls": 1, "tokens": 0})
    assert (crossing.status, crossing.problem, crossing.metric) == (403, "asset-suspended", "calls")
    assert [e["type"] for e in events(meter)] == ["asset.suspended"]


# -- settlement of estimates ---------------------------------------------------------------------


def test_pending_estimates_count_against_a_deny_limit(make_meter: Any) -> None:
    """Units held by unsettled estimates count against a Deny limit, so they cannot overshoot it."""
    meter = make_meter(
        single_asset([tier(0, "Normal", "NotifyOnly"), tier(10, "OverUsage", "Deny")])
    )
    first = meter.admit("c", {}, estimates={"calls": 4})
    second = meter.admit("c", {}, estimates={"calls": 4})
    assert (first.allowed, second.allowed) == (True, True)
    assert (second.assets["calls"].value, second.assets["calls"].pending) == (0, 8)
    assert second.assets["calls"].remaining == 2
    refused = meter.admit("c", {}, estimates={"calls": 4})
    assert (refused.status, refused.problem) == (429, "quota-exceeded")
    assert meter.admit("c", {"calls": 3}).problem == "quota-exceeded"
    assert meter.admit("c", {"calls": 2}).allowed
    usage = meter.usage("c", "calls")
    assert (usage["value"], usage["pending"], usage["remaining"]) == (2, 8, 0)


def test_settlement_records_the_actual_and_releases_the_estimate(make_meter: Any) -> None:
    """Settling records and charges the actual units, releasing the held units and credits."""
    meter = make_meter(
        single_asset(
            [tier(0, "Normal", "NotifyOnly", price={"per_unit": 2}), tier(10, "OverUsage", "Deny")],
            balance={"amount": 100},
        )
    )
    admitted = meter.admit("c", {}, estimates={"calls": 5})
    assert admitted.balances == {"credits": 90}
    assert meter.balance("c", "credits").held == 10
    assert admitted.ticket is not None
    settled = meter.settle(admitted.ticket, {"calls": 3})
    assert (settled.status, settled.assets["calls"].value, settled.assets["calls"].pending) == (
        200,
        3,
        0,
    )
    assert settled.balances == {"credits": 94}
    state = meter.balance("c", "credits")
    assert (state.amount, state.held) == (94, 0)


def test_settlement_records_facts_past_the_limit(make_meter: Any) -> None:
    """Settlement records the actual past a Deny limit and emits; the next admission is refused."""
    meter = make_meter(
        single_asset(
            [
                tier(0, "Normal", "NotifyOnly"),
                tier(8, "Warning", "NotifyOnly"),
                tier(10, "OverUsage", "Deny"),
            ]
        )
    )
    first = meter.admit("c", {}, estimates={"calls": 4})
    second = meter.admit("c", {}, estimates={"calls": 4})
    assert first.ticket is not None and second.ticket is not None
    settled = meter.settle(first.ticket, {"calls": 12})
    assert (settled.allowed, settled.assets["calls"].value, settled.assets["calls"].pending) == (
        True,
        12,
        4,
    )
    assert settled.level == "OverUsage"
    assert meter.admit("c", {"calls": 1}).problem == "quota-exceeded"
    assert meter.settle(second.ticket, {"calls": 0}).assets["calls"].value == 12
    changes = events(meter, etype="quota.level_changed")
    assert [(e["from_level"], e["to_level"], e["policy"], e["value"]) for e in changes] == [
        ("Normal", "OverUsage", "Deny", 12)
    ]


def test_settlement_does_not_count_its_own_estimate_twice(make_meter: Any) -> None:
    """A settlement below SuspendUsage does not suspend, though its own estimate was pending."""
    meter = make_meter(suspending())
    admitted = meter.admit("c", {}, estimates={"calls": 4})
    assert admitted.ticket is not None
    settled = meter.settle(admitted.ticket, {"calls": 3})
    assert (settled.assets["calls"].value, settled.assets["calls"].suspended) == (3, False)
    assert events(meter) == []


def test_settlement_past_a_suspend_from_suspends_the_asset(make_meter: Any) -> None:
    """A settled actual that crosses a SuspendUsage `from` is recorded and suspends the asset."""
    meter = make_meter(suspending())
    admitted = meter.admit("c", {}, estimates={"calls": 4})
    assert admitted.ticket is not None
    settled = meter.settle(admitted.ticket, {"calls": 7})
    assert (settled.allowed, settled.assets["calls"].value, settled.assets["calls"].suspended) == (
        True,
        7,
        True,
    )
    assert [e["type"] for e in events(meter)] == ["asset.suspended", "quota.level_changed"]
    assert meter.admit("c", {"calls": 0}).problem == "asset-suspended"


def test_settlement_without_an_actual_charges_the_estimate(make_meter: Any) -> None:
    """Settling without an actual (the response header was missing) records the estimate."""
    meter = make_meter(
        single_asset(
            [tier(0, "Normal", "NotifyOnly", price={"per_unit": 1})], balance={"amount": 20}
        )
    )
    admitted = meter.admit("c", {}, estimates={"calls": 6})
    assert admitted.ticket is not None
    settled = meter.settle(admitted.ticket)
    assert (settled.assets["calls"].value, settled.balances) == (6, {"credits": 14})


def test_estimate_holds_expire_after_the_hold_ttl_not_the_lease_ttl(
    make_meter: Any, clock: Any
) -> None:
    """An estimate stays pending for `hold_ttl_s` and stops counting once it has passed."""
    meter = make_meter(
        single_asset([tier(0, "Normal", "NotifyOnly"), tier(10, "OverUsage", "Deny")])
    )
    assert meter.admit("c", {}, estimates={"calls": 8}, hold_ttl_s=300).allowed
    clock.advance(299)
    assert meter.usage("c", "calls")["pending"] == 8
    assert meter.admit("c", {"calls": 3}).problem == "quota-exceeded"
    clock.advance(1)
    assert meter.usage("c", "calls")["pending"] == 0
    assert meter.admit("c", {"calls": 3}).allowed


def test_hold_lifetimes_in_milliseconds_are_kept_exactly(make_meter: Any, clock: Any) -> None:
    """A hold given in milliseconds (a route's `reserve_ttl: 1500ms`) lasts 1.5 s, not 1 s or 2 s."""
    meter = make_meter(
        single_asset([tier(0, "Normal", "NotifyOnly"), tier(10, "OverUsage", "Deny")])
    )
    assert meter.admit("c", {}, estimates={"calls": 8}, hold_ttl_ms=1500).allowed
    clock.advance(1.4)
    assert meter.usage("c", "calls")["pending"] == 8
    clock.advance(0.2)
    assert meter.usage("c", "calls")["pending"] == 0
