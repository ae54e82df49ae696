"""What each dashboard page shows, read through the admin API's own functions and the core flows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from metergate.config import LEVELS
from metergate.core import directory
from metergate.core.errors import NotFound
from metergate.core.history import usage_series
from metergate.core.holds import open_holds
from metergate.ui.chart import tier_bar, usage_chart

if TYPE_CHECKING:
    from metergate.admin import AdminAPI

__all__ = ["LEDGER_PAGE", "customer_page", "customers_page", "events_page"]

LEDGER_PAGE = 50
CUSTOMERS_SHOWN = 1000
"""Customers read for the list; beyond that the list says how many more there are."""
EVENTS_SHOWN = 100
CUSTOMER_EVENTS_READ = 200
CUSTOMER_EVENTS_SHOWN = 10


def _balance_state(balance: dict[str, Any]) -> str:
    """`depleted`, `low`, `suspended` or `ok`: what the operator should look at first."""
    if balance["suspended"]:
        return "suspended"
    if balance["available"] <= 0:
        return "depleted"
    if balance.get("low_at") is not None and balance["available"] < balance["low_at"]:
        return "low"
    return "ok"


_ATTENTION = {"depleted": 0, "suspended": 0, "low": 1, "ok": 2}


async def customers_page(api: AdminAPI) -> dict[str, Any]:
    """Every customer with plan, highest level and balances; low, depleted, suspended first."""
    ids = await api.meter.run(directory.customer_ids(api.meter.core))
    rows = []
    for cid in ids[:CUSTOMERS_SHOWN]:
        try:
            view = await api.customer(cid)
            usage = await api.usage(cid)
        except NotFound:
            continue  # removed while the list was read
        balances = [
            {"name": name, **state, "state": _balance_state(state)}
            for name, state in view["balances"].items()
        ]
        suspended = sorted(m for m, u in usage.items() if u["suspended"])
        level = max((LEVELS.index(str(u["level"])) for u in usage.values()), default=0)
        states = [b["state"] for b in balances] + ["suspended"] * bool(suspended)
        attention = min((_ATTENTION[s] for s in states), default=2)
        rows.append(
            {
                "id": cid,
                "plan": view["entitlement"]["plan"],
                "level": LEVELS[level],
                "balances": balances,
                "suspended_assets": suspended,
                "attention": attention,
                "order": (attention, -level, cid),
            }
        )
    rows.sort(key=lambda r: r["order"])
    return {"customers": rows, "more": max(0, len(ids) - CUSTOMERS_SHOWN)}


async def customer_page(api: AdminAPI, cid: str, page: int) -> dict[str, Any]:
    """One customer: usage against tiers with charts, balances with holds, ledger, events."""
    core = api.meter.core
    view = await api.customer(cid)
    usage = await api.usage(cid)
    plan = core.plans[view["entitlement"]["plan"]]
    now_ms = int(core.clock() * 1000)
    metrics = []
    for metric, fields in usage.items():
        asset = plan[metric]
        limit = fields["limit"]
        series = await api.meter.run(usage_series(core, cid, metric))
        metrics.append(
            {
                "name": metric,
                **fields,
                "tiers": asset.tiers,
                "period": asset.period,
                "bar": tier_bar(asset.tiers, int(str(fields["value"])), limit),  # type: ignore[arg-type]
                "chart": None if series is None else usage_chart(series, asset.tiers, now_ms),
            }
        )
    balances = []
    for name, state in view["balances"].items():
        holds = await api.meter.run(open_holds(core, cid, name))
        balances.append({"name": name, **state, "state": _balance_state(state), "holds": holds})
    ledger = await api.meter.run(core.ledger(cid, LEDGER_PAGE, offset=(page - 1) * LEDGER_PAGE))
    events = await api.meter.run(directory.events(core, CUSTOMER_EVENTS_READ, customer=cid))
    return {
        "customer": view,
        "metrics": metrics,
        "balances": balances,
        "ledger": ledger,
        "page": page,
        "has_next": len(ledger) >= LEDGER_PAGE,
        "events": events[:CUSTOMER_EVENTS_SHOWN],
    }


async def events_page(api: AdminAPI, status: str | None) -> dict[str, Any]:
    """The newest outbox events and dead letters (or only one of the two)."""
    rows = await api.meter.run(directory.events(api.meter.core, EVENTS_SHOWN))
    if status in ("queued", "dead"):
        rows = [e for e in rows if e["status"] == status]
    return {"events": rows, "status": status}
