"""Shared by the credit suites: one priced plan for customer c, and its outbox events."""

from __future__ import annotations

import json
from typing import Any

from tests.builders import asset, counters, customer, gateway, plan, tier

from metergate import Meter


def config(**balance: Any) -> dict[str, Any]:
    """A plan whose `calls` cost 1 credit each from c's `credits` (100, overage 20, low at 30)."""
    calls = asset(tier(0, per_unit=1), period="month", balance="credits")
    credits = {"amount": 100, "overage": 20, "low_at": 30, **balance}
    return gateway(
        metrics=counters("calls"),
        plans={"p": plan(calls=calls)},
        customers={"c": customer("p", credits=credits)},
    )


def events(meter: Meter, customer: str = "c") -> list[tuple[str, dict[str, Any]]]:
    """Return the customer's outbox events as (type, data), oldest first."""
    keys = meter.core.keys
    entries = meter.storage.client.xrange(keys.outbox(keys.partition(customer)))
    return [(f["type"], json.loads(f["data"])) for _, f in entries if f["customer"] == customer]
