"""The gateway configs the benchmarks meter with: one customer, an API key, priced tiered counters.

Every request of the HTTP benchmarks meters `api_calls` (a CumulativeCounter over a month, priced in
every tier, with a Deny tier far away so RateLimit fields carry a quota) and charges the `credits`
balance, which holds enough for any run. Nothing is ever refused: a refusal would be cheaper than an
admission and flatter the numbers, so the runner counts non-2xx answers and reports them.
"""

from __future__ import annotations

from typing import Any

API_KEY = "bench-key"
CUSTOMER = "bench"
AUTH_HEADER = f"Authorization: Bearer {API_KEY}"
PATH = "/v1/hello"
CREDITS = 10**15  # ~9,000 years of 3,000 priced requests per second at 1 credit each
FAR = 10**12  # tier thresholds no run reaches


def customer_key(i: int) -> str:
    """Return the API key of customer `i` of a many-customer config (see `gateway_config`)."""
    return f"{API_KEY}-{i}"


def customer_id(i: int) -> str:
    """Return the id of customer `i` of a many-customer config."""
    return f"{CUSTOMER}{i}"


def tiers(count: int) -> list[dict[str, Any]]:
    """Return `count` ascending tiers: priced NotifyOnly tiers, the last one Deny."""
    levels = ["Normal", "Warning", "Critical"]
    out: list[dict[str, Any]] = []
    for i in range(count - 1):
        level = levels[min(i, 2)]
        out.append(
            {"from": i * FAR, "level": level, "policy": "NotifyOnly", "price": {"per_unit": i + 1}}
        )
    out.append({"from": max(1, count - 1) * FAR, "level": "OverUsage", "policy": "Deny"})
    return out


def metric_names(assets: int) -> list[str]:
    """Return the metric names of an `assets`-asset plan: api_calls, then m2, m3..."""
    return ["api_calls"] + [f"m{i}" for i in range(2, assets + 1)]


def gateway_config(
    storage_url: str,
    *,
    assets: int = 1,
    tier_count: int = 3,
    upstream: str | None = None,
    customers: int = 0,
) -> dict[str, Any]:
    """Return the benchmark config: routes under /v1 meter every metric of the plan, cost 1 each.

    With `customers` = N, the config has N customers instead of the one: customer `i` is
    `customer_id(i)`, holds the key `customer_key(i)` and its own `credits` balance.
    """
    names = metric_names(assets)
    balance = {"credits": {"amount": CREDITS}}
    config: dict[str, Any] = {
        "storage": {"url": storage_url, "timeout_ms": 1000},
        "metrics": {m: {"type": "CumulativeCounter", "unit": "requests"} for m in names},
        "plans": {
            "bench": {
                "assets": {
                    m: {"period": "month", "balance": "credits", "tiers": tiers(tier_count)}
                    for m in names
                }
            }
        },
        "customers": {
            CUSTOMER: {
                "api_keys": [API_KEY],
                "entitlement": {"plan": "bench"},
                "balances": balance,
            }
        },
        "routes": [
            {"path": "/ready", "meter": []},
            {"path": "/v1/{rest:path}", "meter": [{"metric": m} for m in names]},
        ],
    }
    if customers:
        config["customers"] = {
            customer_id(i): {
                "api_keys": [customer_key(i)],
                "entitlement": {"plan": "bench"},
                "balances": balance,
            }
            for i in range(customers)
        }
    if upstream is not None:
        config["proxy"] = {"upstream": upstream, "trusted_proxies": ["127.0.0.1/32"]}
    return config
