"""A first admission on every backend."""

from typing import Any


def test_admission_counts_and_charges(make_meter: Any) -> None:
    """An allowed admission increments the counter and draws the balance on every backend."""
    meter = make_meter(
        {
            "metrics": {"calls": {"type": "CumulativeCounter"}},
            "plans": {
                "p": {
                    "assets": {
                        "calls": {
                            "period": "month",
                            "balance": "credits",
                            "tiers": [
                                {
                                    "from": 0,
                                    "level": "Normal",
                                    "policy": "NotifyOnly",
                                    "price": {"per_unit": 2},
                                }
                            ],
                        }
                    }
                }
            },
            "customers": {
                "c": {"entitlement": {"plan": "p"}, "balances": {"credits": {"amount": 10}}}
            },
        }
    )
    decision = meter.admit("c", {"calls": 3})
    assert decision.allowed and decision.status == 200
    assert decision.assets["calls"].value == 3
    assert decision.balances == {"credits": 4}
