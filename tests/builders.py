"""Builders of gateway configs for the tests: plain dicts that `parse_config` accepts.

Each helper returns a new dict, so a test may change what it got without touching another's:

    gateway(
        metrics=counters("calls"),
        plans={"p": plan(calls=asset(tier(0, per_unit=1), period="month", balance="credits"))},
        customers={"c": customer("p", credits=100, api_keys=["key-of-c"])},
        routes=[route("/v1/{rest:path}", "calls")],
        storage_url=url,
    )

A section or key left out (or given as None) is left out of the dict, so the config's own
defaults apply exactly as if the test had written the dict by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Config = dict[str, Any]
"""A config dict, or one section of it."""


def tier(
    from_: int = 0,
    level: str = "Normal",
    policy: str = "NotifyOnly",
    *,
    per_unit: int | None = None,
    **extra: Any,
) -> Config:
    """One tier, applying from unit `from_` on: `tier()` is `{from: 0, Normal, NotifyOnly}`.

    `per_unit=n` is short for `price={"per_unit": n}`; `extra` holds the other tier keys as
    written in a config (`price`, `rate`, `grace`).
    """
    out: Config = {"from": from_, "level": level, "policy": policy}
    if per_unit is not None:
        out["price"] = {"per_unit": per_unit}
    out.update(extra)
    return out


def asset(
    *tiers: Config, period: str | None = None, balance: str | None = None, **extra: Any
) -> Config:
    """How a plan meters one metric: its tiers (lowest first), its period and the balance that
    priced usage draws from; `extra` holds the other asset keys (`strict`)."""
    out: Config = {}
    if period is not None:
        out["period"] = period
    if balance is not None:
        out["balance"] = balance
    out["tiers"] = list(tiers)
    out.update(extra)
    return out


def plan(**assets: Config) -> Config:
    """A plan metering each named metric by its asset: `plan(calls=asset(tier()))`."""
    return {"assets": dict(assets)}


def metric(type: str = "CumulativeCounter", unit: str | None = None) -> Config:
    """A metric of `type` (and `unit`, when given)."""
    out: Config = {"type": type}
    if unit is not None:
        out["unit"] = unit
    return out


def counters(*names: str, unit: str | None = None) -> Config:
    """The `metrics` section for CumulativeCounters of these names, in this order."""
    return {name: metric("CumulativeCounter", unit) for name in names}


def customer(
    plan: str,
    *,
    credits: int | Mapping[str, Any] | None = None,
    api_keys: Iterable[str] | None = None,
    **extra: Any,
) -> Config:
    """A customer on `plan`.

    `credits` is its `credits` balance: an amount, or the balance's keys (`amount`, `overage`,
    `low_at`); left out, the customer has no balance. `api_keys` are the keys as the config
    holds them (plain, or `sha256:` stored forms). `extra` holds the other customer keys
    (`balances` for more balances, which are added after `credits`).
    """
    out: Config = {"entitlement": {"plan": plan}}
    if api_keys is not None:
        out["api_keys"] = list(api_keys)
    balances: Config = {}
    if credits is not None:
        balances["credits"] = {"amount": credits} if isinstance(credits, int) else dict(credits)
    balances.update(extra.pop("balances", {}))
    if balances:
        out["balances"] = balances
    out.update(extra)
    return out


def route(path: str, *meter: str | Config, **extra: Any) -> Config:
    """A route on `path` metering each of `meter`: a metric's name (one unit a request) or a
    meter entry as written in a config (`{"metric": ..., "cost": ...}`); `extra` holds the other
    route keys (`methods`, `refund_on`)."""
    entries = [{"metric": m} if isinstance(m, str) else dict(m) for m in meter]
    return {"path": path, "meter": entries, **extra}


def gateway(
    *,
    metrics: Config | None = None,
    plans: Config | None = None,
    customers: Config | None = None,
    routes: list[Config] | None = None,
    storage_url: str | None = None,
    storage: Config | None = None,
    **sections: Any,
) -> Config:
    """A whole gateway config from its sections; `storage_url` sets `storage.url` (merged with
    `storage`), and `sections` holds the others as written in a config (`proxy`, `admin`,
    `allowances`, `webhooks`, `unmatched`, ...)."""
    out: Config = {}
    if storage_url is not None:
        out["storage"] = {"url": storage_url, **(storage or {})}
    elif storage is not None:
        out["storage"] = dict(storage)
    for name, section in (
        ("metrics", metrics),
        ("plans", plans),
        ("customers", customers),
        ("routes", routes),
    ):
        if section is not None:
            out[name] = section
    out.update(sections)
    return out
