"""Real admissions feed `usage.reported` and `period.closed` (needs the admit.lua lines)."""

from __future__ import annotations

import json
from typing import Any

import httpx
from tests.builders import asset, customer, gateway, metric, plan, tier

from conftest import Clock
from metergate.storage import AsyncStorage
from metergate.worker import Worker

from .conftest import run
from .test_reports import KEYS

SPEC: dict[str, Any] = gateway(
    metrics={"calls": metric(), "seats": metric("Gauge")},
    plans={
        "p": plan(
            calls=asset(
                tier(0, per_unit=2),
                tier(5, "OverUsage", "AllowWithOverage", per_unit=3),
                period="day",
                balance="credits",
            ),
            seats=asset(tier(0), period="day"),
        )
    },
    customers={"acme": customer("p", credits=1000), "idle": customer("p", credits=1000)},
    storage={"partitions": 4},
    usage_report_interval="60s",
)
DAY = 1_800_057_600  # 2027-01-16T00:00:00Z


def test_admissions_feed_reports_and_closes(
    make_meter: Any, storage_url: str, clock: Clock
) -> None:
    """Usage is reported per window with overage and credits; each period closes exactly once."""
    meter = make_meter(SPEC)
    clock.now = DAY
    assert meter.admit("acme", {"calls": 4}).allowed
    assert meter.admit("acme", {"calls": 3}).allowed  # the last 2 units are overage
    assert meter.admit("idle", {"calls": 1}).allowed
    meter.record("acme", "seats", 9)
    events: list[dict[str, Any]] = []

    async def scenario(storage: AsyncStorage) -> None:
        async with httpx.AsyncClient() as http:
            worker = Worker(meter.config, storage, clock, http)
            clock.advance(90)
            assert (await worker.run_once()).reported == 2
            clock.advance(
                86_400
            )  # the next day: acme is admitted again (closing its day), idle not
            meter.admit("acme", {"calls": 1})
            meter.record("acme", "seats", 2)
            clock.advance(90)
            assert (await worker.run_once()).closed == 1  # idle's day, closed by the worker
            assert (await worker.run_once()).closed == 0
        for p in range(4):
            for _, fields in await storage.client.xrange(KEYS.outbox(p)):
                events.append({**fields, "data": json.loads(fields["data"])})

    run(scenario, storage_url)
    dep = meter.core.deployment  # the deployment's id is in every deterministic id
    assert len(dep) == 26
    usage = {e["id"]: e["data"] for e in events if e["type"] == "usage.reported"}
    acme = usage[f"usage:{dep}:acme:calls:{DAY}"]
    assert (acme["quantity"], acme["overage_quantity"], acme["credits_charged"]) == (7, 2, 16)
    assert acme["period_start"] == "2027-01-16T00:00:00Z"
    closed = {e["id"]: e["data"] for e in events if e["type"] == "period.closed"}
    assert set(closed) == {
        f"period:{dep}:acme:calls:{DAY}",
        f"period:{dep}:acme:seats:{DAY}",
        f"period:{dep}:idle:calls:{DAY}",
    }
    calls = closed[f"period:{dep}:acme:calls:{DAY}"]
    assert (calls["value"], calls["overage"], calls["credits_charged"]) == (7, 2, 16)
    assert calls["period_end"] == "2027-01-17T00:00:00Z"
    assert (
        closed[f"period:{dep}:acme:seats:{DAY}"]["value"],
        closed[f"period:{dep}:acme:seats:{DAY}"]["peak"],
    ) == (9, 9)
    assert closed[f"period:{dep}:idle:calls:{DAY}"]["value"] == 1
