"""The open holds of a balance (reservations and response-priced admissions), for the dashboard."""

from __future__ import annotations

from typing import Any

from metergate.core.flows import Batch, Command, Flow, MeterCore

__all__ = ["open_holds"]

HOLDS_READ = 200
"""Holds listed per balance, soonest to expire first."""


def open_holds(core: MeterCore, customer: str, balance: str) -> Flow[list[dict[str, Any]]]:
    """Return a balance's unexpired holds, soonest to expire first: id, amount, expires (ms).

    An expired hold stops counting at its expiry, swept or not, so it is not listed."""
    bkey, bxkey = core.keys.balance(customer, balance)
    now_ms = int(core.clock() * 1000)
    rows = yield Command(
        ("ZRANGEBYSCORE", bxkey, f"({now_ms}", "+inf", "WITHSCORES", "LIMIT", "0", str(HOLDS_READ))
    )
    pairs = _pairs(rows)
    if not pairs:
        return []
    (amounts,) = yield Batch((("HMGET", bkey, *("h:" + rid for rid, _ in pairs)),))
    return [
        {"id": rid, "amount": int(amount or 0), "expires": int(float(score))}
        for (rid, score), amount in zip(pairs, amounts, strict=True)
    ]


def _pairs(rows: Any) -> list[tuple[str, Any]]:
    """WITHSCORES answers (member, score) pairs or a flat list, depending on the driver."""
    rows = list(rows or [])
    if rows and isinstance(rows[0], (list, tuple)):
        return [(str(m), s) for m, s in rows]
    return [(str(m), s) for m, s in zip(rows[::2], rows[1::2], strict=True)]
