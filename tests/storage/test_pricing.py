"""Tier pricing on every backend: per-tier unit prices, rounding, bases per period, 402 refusals."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests import builders

from metergate import Meter

MakeMeter = Callable[..., Meter]
DAY = 86_400

# units 1-10 cost 1 each; 11-20 cost 2 each plus a base of 5; from 21 on, 3 per 2 units + base 7
TIERS = [
    {"from": 0, "price": {"per_unit": 1}},
    {"from": 10, "price": {"per_unit": 2, "base": 5}},
    {"from": 20, "price": {"per_unit": 3, "per": 2, "base": 7}},
]


def config(tiers: list[dict[str, Any]], customer: str = "c", **balance: Any) -> dict[str, Any]:
    """A plan pricing `calls` by `tiers` (NotifyOnly) from the customer's `credits` balance."""
    tiers = [{"level": "Normal", "policy": "NotifyOnly", **t} for t in tiers]
    return builders.gateway(
        metrics=builders.counters("calls", "tokens"),
        plans={
            "p": builders.plan(
                calls=builders.asset(*tiers, period="month", balance="credits"),
                tokens=builders.asset(
                    builders.tier(0, per_unit=2), period="month", balance="credits"
                ),
            )
        },
        customers={customer: builders.customer("p", credits={"amount": 1000, **balance})},
    )


def closed_form(tiers: list[dict[str, Any]], total: int) -> int:
    """The price of `total` units in a period: sum_k ceil(units_k * per_unit / per) + bases."""
    price = 0
    for k, tier in enumerate(tiers):
        top = tiers[k + 1]["from"] if k + 1 < len(tiers) else total
        units = max(0, min(total, top) - tier["from"])
        p = tier.get("price", {})
        if units:
            price += math.ceil(units * p.get("per_unit", 0) / p.get("per", 1)) + p.get("base", 0)
    return price


def events(meter: Meter, customer: str = "c") -> list[tuple[str, dict[str, Any]]]:
    """Return the customer's outbox events as (type, data), oldest first."""
    keys = meter.core.keys
    entries = meter.storage.client.xrange(keys.outbox(keys.partition(customer)))
    return [(f["type"], json.loads(f["data"])) for _, f in entries if f["customer"] == customer]


def charges(meter: Meter, sizes: list[int], customer: str = "c") -> list[int]:
    """Admit each size in turn (all must be allowed) and return the credits each one drew."""
    out = []
    available = meter.balance(customer, "credits").available
    for size in sizes:
        decision = meter.admit(customer, {"calls": size})
        assert decision.allowed, decision
        out.append(available - decision.balances["credits"])
        available = decision.balances["credits"]
    return out


def test_each_unit_is_priced_by_the_tier_it_falls_in(make_meter: MakeMeter) -> None:
    """Units 1-10, 11-20 and 21+ cost their tier's price; a tier's base comes with its 1st unit."""
    meter = make_meter(config(TIERS))
    assert charges(meter, [10, 1, 9, 2, 1, 1]) == [10, 2 + 5, 18, 3 + 7, 2, 1]
    # the six charges of one usage window are one ledger line
    usage = [(e["delta"], e["count"]) for e in meter.ledger("c") if e["kind"] == "usage"]
    assert usage == [(-48, 6)]
    assert meter.balance("c", "credits").amount == 1000 - 48


def test_one_admission_spanning_every_tier_prices_each_part(make_meter: MakeMeter) -> None:
    """One admission of 25 units pays 10 x 1, 10 x 2 + 5 and ceil(5 x 3 / 2) + 7."""
    meter = make_meter(config(TIERS))
    assert charges(meter, [25]) == [10 + 25 + 15]
    assert charges(meter, [1]) == [1]  # unit 26 completes the pair that unit 25 started


def test_per_rounds_up_without_losing_or_double_charging_a_fraction(make_meter: MakeMeter) -> None:
    """At 2 credits per 3 units, single units cost 1, 1, 0, 1, 1, 0: each third rounded once."""
    meter = make_meter(config([{"from": 0, "price": {"per_unit": 2, "per": 3}}]))
    assert charges(meter, [1, 1, 1, 1, 1, 1]) == [1, 1, 0, 1, 1, 0]
    assert charges(meter, [2, 7]) == [2, 4]  # units 7-8 then 9-15: ceil(16/3) - 4, ceil(30/3) - 6


def test_base_is_charged_once_per_tier_per_period(make_meter: MakeMeter, clock: Any) -> None:
    """A tier's base is charged when usage first enters it in a period, and again after rollover."""
    meter = make_meter(config(TIERS))
    assert charges(meter, [11, 1, 8, 1]) == [10 + 2 + 5, 2, 16, 2 + 7]
    clock.advance(20 * DAY)  # 2027-02-04: the February period
    decision = meter.admit("c", {"calls": 11})
    assert (decision.assets["calls"].value, decision.balances) == (11, {"credits": 956 - 17})
    assert charges(meter, [1]) == [2]


def test_402_when_available_plus_overage_cannot_cover_and_nothing_changes(
    make_meter: MakeMeter,
) -> None:
    """With 20 credits, 6 held and 5 of overage, 19 credits can be spent; 21 is refused with 402."""
    meter = make_meter(config([{"from": 0, "price": {"per_unit": 3}}], amount=20, overage=5))
    meter.reserve("c", "credits", 6, 60)
    before = meter.balance("c", "credits"), meter.ledger("c"), events(meter)

    refused = meter.admit("c", {"calls": 7})  # 21 credits > 14 available + 5 overage
    assert (refused.allowed, refused.status, refused.problem) == (
        False,
        402,
        "insufficient-credits",
    )
    assert refused.assets["calls"].value == 0
    assert refused.balances == {"credits": 14}
    assert (meter.balance("c", "credits"), meter.ledger("c"), events(meter)) == before

    allowed = meter.admit("c", {"calls": 6})  # 18 credits: down to -4
    assert (allowed.status, allowed.assets["calls"].value, allowed.balances) == (
        200,
        6,
        {"credits": -4},
    )
    refused = meter.admit("c", {"calls": 1})  # 3 more would reach -7, below the floor of -5
    assert (refused.status, refused.problem, refused.assets["calls"].value) == (
        402,
        "insufficient-credits",
        6,
    )
    assert meter.balance("c", "credits").available == -4


def test_price_exactly_reaching_the_floor_is_allowed(make_meter: MakeMeter) -> None:
    """An admission whose price takes available to exactly -overage is allowed."""
    meter = make_meter(config([{"from": 0, "price": {"per_unit": 3}}], amount=10, overage=5))
    decision = meter.admit("c", {"calls": 5})
    assert (decision.status, decision.balances) == (200, {"credits": -5})
    assert meter.admit("c", {"calls": 1}).status == 402


def test_unpriced_units_need_no_credit(make_meter: MakeMeter) -> None:
    """Units in a tier without a price are admitted on an empty balance and charge nothing."""
    meter = make_meter(config([{"from": 0}, {"from": 5, "price": {"per_unit": 1}}], amount=0))
    decision = meter.admit("c", {"calls": 5})
    assert (decision.status, decision.balances) == (200, {"credits": 0})
    assert meter.admit("c", {"calls": 1}).status == 402
    assert [e["kind"] for e in meter.ledger("c")] == ["initial"]


def test_an_admission_of_two_priced_metrics_is_all_or_nothing(make_meter: MakeMeter) -> None:
    """Two metrics drawing one balance are priced together: refused together or charged together."""
    meter = make_meter(config([{"from": 0, "price": {"per_unit": 1}}], amount=10))
    refused = meter.admit("c", {"calls": 4, "tokens": 4})  # 4 + 8 > 10
    assert (refused.status, refused.assets["calls"].value, refused.assets["tokens"].value) == (
        402,
        0,
        0,
    )
    allowed = meter.admit("c", {"calls": 4, "tokens": 3})  # 4 + 6 = 10
    assert (allowed.status, allowed.balances) == (200, {"credits": 0})
    assert [e["delta"] for e in meter.ledger("c") if e["kind"] == "usage"] == [-10]


@st.composite
def priced_tiers(draw: st.DrawFn) -> list[dict[str, Any]]:
    """One to four ascending tiers, each with a random per_unit, per and base."""
    starts = draw(st.lists(st.integers(1, 60), max_size=3, unique=True))
    tiers = []
    for start in [0, *sorted(starts)]:
        price = {
            "per_unit": draw(st.integers(0, 7)),
            "per": draw(st.integers(1, 5)),
            "base": draw(st.integers(0, 9)),
        }
        tiers.append({"from": start, "price": price})
    return tiers


# a new Meter per example (the tiers are drawn): the Cluster client is slow to start, so fewer there
EXAMPLES = {"memory": 30, "redis": 40, "cluster": 15}


def test_admissions_sum_to_the_closed_form_price(make_meter: MakeMeter, storage_url: str) -> None:
    """However a period's usage is split into admissions, charges sum to the closed-form price."""
    backend = storage_url.split(":", 1)[0].removeprefix("redis+")
    examples = EXAMPLES.get(backend, EXAMPLES["redis"])

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(tiers=priced_tiers(), sizes=st.lists(st.integers(0, 25), min_size=1, max_size=12))
    def check(tiers: list[dict[str, Any]], sizes: list[int]) -> None:
        customer = f"h{uuid.uuid4().hex[:12]}"
        meter = make_meter(config(tiers, customer, amount=10**9))
        drawn = charges(meter, sizes, customer)
        totals = [sum(sizes[: i + 1]) for i in range(len(sizes))]
        expected = [closed_form(tiers, t) for t in totals]
        assert drawn == [b - a for a, b in zip([0, *expected], expected, strict=False)]
        price = closed_form(tiers, sum(sizes))
        assert meter.balance(customer, "credits").amount == 10**9 - price
        usage = sum(e["delta"] for e in meter.ledger(customer, 10_000) if e["kind"] == "usage")
        assert usage == -price

    check()


@pytest.mark.parametrize(
    ("total", "price"), [(0, 0), (10, 10), (11, 17), (20, 35), (21, 44), (22, 45)]
)
def test_closed_form_matches_hand_computed_prices(total: int, price: int) -> None:
    """The reference price used by the property test agrees with hand-computed tier prices."""
    assert closed_form(TIERS, total) == price
