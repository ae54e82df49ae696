"""Start-up with customers already stored: unchanged ones are not written again, changed ones are."""

from __future__ import annotations

import copy
from typing import Any

from metergate import Meter
from metergate.config import hash_api_key


def config(customers: int = 3) -> dict[str, Any]:
    """A plan drawing a balance, and `customers` customers with a key and that balance each."""
    return {
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
                                "price": {"per_unit": 1},
                            }
                        ],
                    }
                }
            },
            "q": {
                "assets": {
                    "calls": {
                        "period": "month",
                        "tiers": [{"from": 0, "level": "Normal", "policy": "NotifyOnly"}],
                    }
                }
            },
        },
        "customers": {
            f"c{i}": {
                "api_keys": [f"key-{i}"],
                "entitlement": {"plan": "p"},
                "balances": {"credits": {"amount": 100}},
            }
            for i in range(customers)
        },
    }


def start(meter: Meter) -> list[Any]:
    """Bootstrap the meter and return the storage calls it made."""
    real_run, calls = meter.storage.run, []

    def counted(call: Any) -> Any:
        calls.append(call)
        return real_run(call)

    meter.storage.run = counted  # type: ignore[method-assign]
    try:
        meter.run(meter.core.bootstrap())
    finally:
        meter.storage.run = real_run  # type: ignore[method-assign]
    return calls


def test_a_second_start_with_unchanged_customers_writes_none_of_them(make_meter: Any) -> None:
    """The first start writes every customer; a second start of 3 or of 30 unchanged customers
    makes the same few storage calls, and neither runs a script."""
    made: dict[int, int] = {}
    for count in (3, 30):
        cfg = config(count)
        first = start(make_meter(cfg))
        assert len(first) > count
        second = start(make_meter(cfg))
        assert not [call for call in second if type(call).__name__ == "Script"]
        made[count] = len(second)
        meter = make_meter(cfg)
        for i in range(count):
            assert meter.customer_for_key(f"key-{i}") == f"c{i}"
    assert made[3] == made[30] <= 5


def test_a_restart_keeps_what_changed_at_runtime(make_meter: Any) -> None:
    """Balances used, topped up and reconfigured, a plan changed and a key revoked at runtime
    stay as they are when the process starts again with the same config."""
    cfg = config()
    meter = make_meter(cfg)
    assert meter.admit("c0", {"calls": 7}).allowed
    meter.topup("c1", "credits", 50)
    meter.create_balance("c2", "credits", {"amount": 100, "overage": 30})
    meter.set_entitlement("c1", "q")
    assert meter.run(meter.core.remove_api_key(hash_api_key("key-2")))
    again = make_meter(cfg)
    assert again.balance("c0", "credits").amount == 93
    assert again.balance("c1", "credits").amount == 150
    assert again.balance("c2", "credits").overage == 30
    assert again.run(again.core.entitlement("c1")).plan == "q"  # type: ignore[union-attr]
    assert again.customer_for_key("key-2") is None
    assert again.customer_for_key("key-0") == "c0"


def test_a_changed_customer_is_applied_at_the_next_start(make_meter: Any) -> None:
    """A key and a balance added to one customer's config, and a new customer, are stored by the
    next start; the balance used meanwhile is kept."""
    cfg = config()
    meter = make_meter(cfg)
    assert meter.admit("c0", {"calls": 5}).allowed
    changed = copy.deepcopy(cfg)
    changed["customers"]["c0"]["api_keys"].append("key-0b")
    changed["customers"]["c0"]["balances"]["bonus"] = {"amount": 9}
    changed["customers"]["new"] = {
        "api_keys": ["key-new"],
        "entitlement": {"plan": "q"},
    }
    again = make_meter(changed)
    calls = start(again)
    scripts = [call for call in calls if type(call).__name__ == "Script"]
    # c0's entitlement, its two balances, and the new customer's entitlement
    assert len(scripts) == 4
    assert again.customer_for_key("key-0b") == "c0"
    assert again.customer_for_key("key-0") == "c0"
    assert again.customer_for_key("key-new") == "new"
    assert again.balance("c0", "bonus").amount == 9
    assert again.balance("c0", "credits").amount == 95
    assert again.run(again.core.entitlement("new")).plan == "q"  # type: ignore[union-attr]
    assert len([c for c in start(make_meter(changed)) if type(c).__name__ == "Script"]) == 0
