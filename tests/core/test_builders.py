"""The tests' config builder writes what a config file would, and `parse_config` accepts it."""

from __future__ import annotations

from tests.builders import asset, counters, customer, gateway, metric, plan, route, tier

from metergate.config import hash_api_key, parse_config


def test_built_config_is_the_hand_written_dict_and_parses() -> None:
    """Each helper writes the keys it is given and leaves the others to the config's defaults."""
    built = gateway(
        metrics={**counters("calls"), "seats": metric("Gauge", unit="seats")},
        plans={
            "p": plan(
                calls=asset(
                    tier(0, per_unit=2),
                    tier(5, "OverUsage", "Deny"),
                    period="month",
                    balance="credits",
                ),
                seats=asset(tier(0, "Normal", "RateLimit", rate={"limit": 2, "per": "1m"})),
            ),
            "free": plan(seats=asset(tier(0))),
        },
        customers={
            "c": customer("p", credits=10, api_keys=["key-of-c"]),
            "d": customer("p", credits={"amount": 3, "low_at": 1}, balances={"bonus": {}}),
            "e": customer("free"),
        },
        routes=[route("/v1/{rest:path}", "calls", {"metric": "seats"}, refund_on=[])],
        storage_url="memory://builders",
        storage={"partitions": 4},
        unmatched="deny",
    )
    assert built == {
        "storage": {"url": "memory://builders", "partitions": 4},
        "metrics": {
            "calls": {"type": "CumulativeCounter"},
            "seats": {"type": "Gauge", "unit": "seats"},
        },
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
                            },
                            {"from": 5, "level": "OverUsage", "policy": "Deny"},
                        ],
                    },
                    "seats": {
                        "tiers": [
                            {
                                "from": 0,
                                "level": "Normal",
                                "policy": "RateLimit",
                                "rate": {"limit": 2, "per": "1m"},
                            }
                        ]
                    },
                }
            },
            "free": {
                "assets": {
                    "seats": {"tiers": [{"from": 0, "level": "Normal", "policy": "NotifyOnly"}]}
                }
            },
        },
        "customers": {
            "c": {
                "entitlement": {"plan": "p"},
                "api_keys": ["key-of-c"],
                "balances": {"credits": {"amount": 10}},
            },
            "d": {
                "entitlement": {"plan": "p"},
                "balances": {"credits": {"amount": 3, "low_at": 1}, "bonus": {}},
            },
            "e": {"entitlement": {"plan": "free"}},
        },
        "routes": [
            {
                "path": "/v1/{rest:path}",
                "meter": [{"metric": "calls"}, {"metric": "seats"}],
                "refund_on": [],
            }
        ],
        "unmatched": "deny",
    }
    config = parse_config(built)
    assert config.customers["c"].api_keys == [hash_api_key("key-of-c")]
    assert config.plans["p"].assets["seats"].period is None
    assert config.storage.partitions == 4


def test_each_call_returns_new_dicts() -> None:
    """Changing a built config leaves the next one as built."""
    first, second = plan(calls=asset(tier(0))), plan(calls=asset(tier(0)))
    first["assets"]["calls"]["tiers"][0]["from"] = 7
    assert second["assets"]["calls"]["tiers"][0]["from"] == 0
