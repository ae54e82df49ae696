"""The ledger: usage charges add up to one line per balance and usage report window."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tests.storage.credits import config

from metergate import Meter

MakeMeter = Callable[..., Meter]
WINDOW_S = 60  # the default usage_report_interval


def kinds(meter: Meter) -> list[tuple[str, int, int | None]]:
    """Return customer c's ledger as (kind, delta, count), newest first."""
    return [(e["kind"], e["delta"], e.get("count")) for e in meter.ledger("c", 10_000)]


def stored(meter: Meter) -> list[dict[str, Any]]:
    """Return the lines stored in c's ledger list (without the usage line still open)."""
    rows = meter.storage.client.lrange(meter.core.keys.ledger("c"), 0, -1)
    return [json.loads(row) for row in rows]


def test_charges_of_one_window_are_one_line_with_their_count(make_meter: MakeMeter) -> None:
    """Many priced admissions in one window leave one usage line, and the list does not grow."""
    meter = make_meter(config(amount=10_000))
    for _ in range(50):
        assert meter.admit("c", {"calls": 2}).allowed
    [usage, initial] = meter.ledger("c")
    assert (usage["kind"], usage["delta"], usage["count"]) == ("usage", -100, 50)
    assert (usage["amount"], usage["held"]) == (9_900, 0)
    assert usage["op"] == f"usage:{usage['window']}"
    assert usage["window"] % (WINDOW_S * 1000) == 0 and usage["window"] <= usage["time"]
    assert initial["kind"] == "initial"
    assert [e["kind"] for e in stored(meter)] == ["initial"]  # one line per window, not per call


def test_a_new_window_starts_a_new_line(make_meter: MakeMeter, clock: Any) -> None:
    """The open line is stored when the next window's first charge comes."""
    meter = make_meter(config())
    meter.admit("c", {"calls": 3})
    meter.admit("c", {"calls": 4})
    clock.advance(WINDOW_S)
    meter.admit("c", {"calls": 5})
    assert kinds(meter) == [("usage", -5, 1), ("usage", -7, 2), ("initial", 100, None)]
    assert [e["kind"] for e in stored(meter)] == ["usage", "initial"]
    first, second = meter.ledger("c")[1], meter.ledger("c")[0]
    assert second["window"] - first["window"] == WINDOW_S * 1000
    assert (first["amount"], second["amount"]) == (93, 88)


def test_any_other_line_of_the_balance_closes_the_usage_line(make_meter: MakeMeter) -> None:
    """A top-up between charges keeps the order: the charges before it, it, the charges after."""
    meter = make_meter(config())
    meter.admit("c", {"calls": 1})
    meter.admit("c", {"calls": 2})
    meter.topup("c", "credits", 50)
    meter.admit("c", {"calls": 4})
    rid = meter.reserve("c", "credits", 10, ttl_s=60)
    meter.admit("c", {"calls": 8})
    assert kinds(meter) == [
        ("usage", -8, 1),
        ("hold", 0, None),
        ("usage", -4, 1),
        ("topup", 50, None),
        ("usage", -3, 2),
        ("initial", 100, None),
    ]
    assert meter.ledger("c")[1]["op"] == rid
    # amounts after each line tell the same story as the deltas
    lines = meter.ledger("c", 10_000)
    assert [e["amount"] for e in lines] == [135, 143, 143, 147, 97, 100]
    assert meter.balance("c", "credits").amount == sum(e["delta"] for e in lines) == 135


def test_the_limit_counts_the_open_line(make_meter: MakeMeter, clock: Any) -> None:
    """`limit` caps the lines returned, the open usage line included and first."""
    meter = make_meter(config())
    meter.admit("c", {"calls": 1})
    clock.advance(WINDOW_S)
    meter.admit("c", {"calls": 1})
    assert [e["kind"] for e in meter.ledger("c", 1)] == ["usage"]
    assert len(meter.ledger("c", 2)) == 2 and len(meter.ledger("c", 3)) == 3


def test_two_balances_each_keep_their_own_line(make_meter: MakeMeter, clock: Any) -> None:
    """Usage lines are per balance; the ledger merges them with the stored lines by time."""
    cfg = config()
    cfg["metrics"]["tokens"] = {"type": "CumulativeCounter"}
    tier = {"from": 0, "level": "Normal", "policy": "NotifyOnly", "price": {"per_unit": 1}}
    cfg["plans"]["p"]["assets"]["tokens"] = {"period": "month", "balance": "bonus", "tiers": [tier]}
    cfg["customers"]["c"]["balances"]["bonus"] = {"amount": 30}
    meter = make_meter(cfg)
    meter.admit("c", {"calls": 2, "tokens": 5})
    clock.advance(1)
    meter.admit("c", {"tokens": 1})
    lines = meter.ledger("c")
    assert [(e["balance"], e["kind"], e["delta"]) for e in lines[:2]] == [
        ("bonus", "usage", -6),
        ("credits", "usage", -2),
    ]
    bonus = [e["delta"] for e in lines if e["balance"] == "bonus"]
    assert bonus == [-6, 30] and meter.balance("c", "bonus").amount == sum(bonus) == 24
