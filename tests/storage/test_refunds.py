"""Refunds on every backend: the exact inverse of an admission, once, and voided late arrivals."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.storage.credits import config

from metergate import Meter
from metergate.core.flows import ALREADY_APPLIED
from metergate.core.http import Deferred
from metergate.recovery import ThreadRecovery

MakeMeter = Callable[..., Meter]


def ledger_sum(meter: Meter, customer: str = "c") -> int:
    """Return the sum of the deltas in the customer's whole ledger."""
    return sum(e["delta"] for e in meter.ledger(customer, 10_000))


def state(meter: Meter) -> tuple[Any, ...]:
    """Return c's calls value and overage and its balance's amount and held."""
    usage = meter.usage("c", "calls")
    b = meter.balance("c", "credits")
    return usage["value"], usage["pending"], b.amount, b.held


def test_refund_returns_units_and_credits_once(make_meter: MakeMeter) -> None:
    """A refund takes the units out of the period and returns the charge, once, as a ledger line."""
    meter = make_meter(config())
    meter.admit("c", {"calls": 3})
    decision = meter.admit("c", {"calls": 5})
    assert decision.ticket is not None
    assert state(meter) == (8, 0, 92, 0)
    ticket = decision.ticket
    assert meter.refund("c", ticket.attempt, ticket.operation) == "refunded"
    assert meter.refund("c", ticket.attempt, ticket.operation) == "done"
    assert state(meter) == (3, 0, 97, 0)
    line = meter.ledger("c")[0]
    assert (line["kind"], line["delta"], line["amount"]) == ("refund", 5, 97)
    assert ledger_sum(meter) == 97


def test_a_refund_before_its_admission_voids_it(make_meter: MakeMeter) -> None:
    """A refund that arrives first leaves a tombstone: the late admission changes nothing."""
    meter = make_meter(config())
    attempt = meter.core.new_attempt()
    assert meter.refund("c", attempt) == "void"
    decision = meter.admit("c", {"calls": 5}, attempt=attempt)
    assert not decision.allowed and decision.status == 503
    assert state(meter) == (0, 0, 100, 0)
    assert ledger_sum(meter) == 100


def test_an_attempt_applies_once(make_meter: MakeMeter) -> None:
    """The same attempt sent twice (a degraded request recorded again) is charged once."""
    meter = make_meter(config())
    attempt = meter.core.new_attempt()
    assert meter.admit("c", {"calls": 5}, attempt=attempt).allowed
    assert meter.admit("c", {"calls": 5}, attempt=attempt).allowed
    assert state(meter) == (5, 0, 95, 0)


def test_refund_releases_an_estimate_hold(make_meter: MakeMeter) -> None:
    """A refunded response-priced admission releases its held units and credits, charging nothing."""
    meter = make_meter(config())
    decision = meter.admit("c", {}, estimates={"calls": 10})
    assert state(meter) == (0, 10, 100, 10)
    assert decision.ticket is not None
    assert meter.refund("c", decision.ticket.attempt) == "refunded"
    assert state(meter) == (0, 0, 100, 0)
    assert ledger_sum(meter) == 100


def test_refund_of_a_keyed_admission_lets_a_retry_be_new(make_meter: MakeMeter) -> None:
    """After a keyed admission is refunded, the same key is admitted and charged anew."""
    meter = make_meter(config())
    first = meter.admit("c", {"calls": 4}, idempotency_key="job-1")
    assert first.ticket is not None
    assert meter.refund("c", first.ticket.attempt, first.ticket.operation) == "refunded"
    assert meter.admit("c", {"calls": 4}, idempotency_key="job-1").allowed
    assert state(meter) == (4, 0, 96, 0)


def test_refund_undoes_a_base_price_and_overage(make_meter: MakeMeter) -> None:
    """A refund returns a tier's base price and lets the next admission into the tier pay it."""
    cfg = config()
    tiers = [
        {"from": 0, "level": "Normal", "policy": "NotifyOnly"},
        {
            "from": 2,
            "level": "Warning",
            "policy": "AllowWithOverage",
            "price": {"per_unit": 1, "base": 10},
        },
    ]
    cfg["plans"]["p"]["assets"]["calls"]["tiers"] = tiers
    meter = make_meter(cfg)
    meter.admit("c", {"calls": 2})
    decision = meter.admit("c", {"calls": 3})
    assert decision.ticket is not None
    assert meter.balance("c", "credits").amount == 87
    assert meter.usage("c", "calls")["overage"] == 3
    meter.refund("c", decision.ticket.attempt)
    assert meter.balance("c", "credits").amount == 100
    assert meter.usage("c", "calls")["overage"] == 0
    meter.admit("c", {"calls": 1})
    assert meter.balance("c", "credits").amount == 89
    assert ledger_sum(meter) == 89


def test_refund_ends_an_updown_lease(make_meter: MakeMeter) -> None:
    """A refunded UpDownCounter admission gives its in-flight units back at once."""
    cfg = config()
    cfg["metrics"]["conc"] = {"type": "UpDownCounter"}
    cfg["plans"]["p"]["assets"]["conc"] = {
        "tiers": [{"from": 0, "level": "Normal", "policy": "NotifyOnly"}]
    }
    meter = make_meter(cfg)
    decision = meter.admit("c", {"conc": 1, "calls": 1})
    assert meter.usage("c", "conc")["value"] == 1
    assert decision.ticket is not None
    meter.refund("c", decision.ticket.attempt)
    assert meter.usage("c", "conc")["value"] == 0
    assert state(meter) == (0, 0, 100, 0)


def test_a_late_estimate_is_settled_by_its_deferred_record(make_meter: MakeMeter) -> None:
    """Open mode: when the response-priced admission whose reply was lost did arrive, the deferred
    record settles its hold with the actual units instead of charging a second time."""
    meter = make_meter(config())
    attempt = meter.core.new_attempt()
    assert meter.admit("c", {}, estimates={"calls": 10}, attempt=attempt).allowed  # arrived late
    recovery = ThreadRecovery(meter)
    recovery.record(Deferred("c", None, {"calls": 4}, "degraded-1", attempt, {"calls": 4}))
    while len(recovery):
        time.sleep(0.01)
    assert state(meter) == (4, 0, 96, 0)
    assert ledger_sum(meter) == 96


def test_a_deferred_record_is_the_charge_when_nothing_arrived(make_meter: MakeMeter) -> None:
    """Open mode: when the lost admission never arrived, the deferred record is its one charge."""
    meter = make_meter(config())
    recovery = ThreadRecovery(meter)
    attempt = meter.core.new_attempt()
    recovery.record(Deferred("c", None, {"calls": 4}, "degraded-2", attempt, {"calls": 4}))
    while len(recovery):
        time.sleep(0.01)
    assert meter.admit("c", {"calls": 4}, attempt=attempt).detail == ALREADY_APPLIED
    assert state(meter) == (4, 0, 96, 0)
