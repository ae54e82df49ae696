"""A first admission on every backend."""

from typing import Any

from tests.builders import asset, counters, customer, gateway, plan, tier


def test_admission_counts_and_charges(make_meter: Any) -> None:
    """An allowed admission increments the counter and draws the balance on every backend."""
    meter = make_meter(
        gateway(
            metrics=counters("calls"),
            plans={"p": plan(calls=asset(tier(0, per_unit=2), period="month", balance="credits"))},
            customers={"c": customer("p", credits=10)},
        )
    )
    decision = meter.admit("c", {"calls": 3})
    assert decision.allowed and decision.status == 200
    assert decision.assets["calls"].value == 3
    assert decision.balances == {"credits": 4}
