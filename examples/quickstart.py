"""Walk one customer through the tiers of a plan with `Meter` on the embedded backend.

Run: python examples/quickstart.py
"""

from metergate import Meter

CONFIG = {
    "storage": {"url": "memory://quickstart"},
    "metrics": {"api_calls": {"type": "CumulativeCounter", "unit": "requests"}},
    "plans": {
        "starter": {
            "assets": {
                "api_calls": {
                    "period": "month",
                    "balance": "credits",
                    "tiers": [
                        {
                            "from": 0,
                            "level": "Normal",
                            "policy": "NotifyOnly",
                            "price": {"per_unit": 2},
                        },
                        {
                            "from": 3,
                            "level": "Warning",
                            "policy": "NotifyOnly",
                            "price": {"per_unit": 2},
                        },
                        {
                            "from": 5,
                            "level": "Critical",
                            "policy": "RateLimit",
                            "rate": {"limit": 2, "per": "1m"},
                            "price": {"per_unit": 3},
                        },
                        {"from": 9, "level": "OverUsage", "policy": "Deny"},
                    ],
                }
            }
        }
    },
    "customers": {
        "acme": {
            "entitlement": {"plan": "starter"},
            "balances": {"credits": {"amount": 100, "low_at": 80}},
        }
    },
}


def main() -> None:
    now = [1_800_000_000.0]
    meter = Meter(CONFIG, clock=lambda: now[0])
    print(
        f"{'call':>4}  {'status':>6}  {'problem':<22} {'level':<9} {'value':>5} {'credits':>7} retry"
    )
    for call in range(1, 19):
        d = meter.admit("acme", {"api_calls": 1})
        usage = d.assets.get("api_calls")
        print(
            f"{call:>4}  {d.status:>6}  {d.problem or '-':<22} {d.level or '-':<9} "
            f"{usage.value if usage else '-':>5} {d.balances.get('credits', '-'):>7} "
            f"{d.retry_after or ''}"
        )
        now[0] += 10  # ten seconds between calls, so the throttle lets some through
    print()
    print("usage:", meter.usage("acme", "api_calls"))
    print("balance:", meter.balance("acme", "credits"))
    print("ledger (newest first):")
    for entry in meter.ledger("acme", limit=5):
        print("  ", entry)
    meter.close()


if __name__ == "__main__":
    main()
