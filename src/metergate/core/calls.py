"""The vocabulary of the operation flows: the storage calls they yield, shared constants and
the small values (entitlements, admission shapes, reservation ids) several flows use."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from metergate.config import (
    MAX_SAFE_INT,
)
from metergate.core.errors import InvalidAmount, NotFound
from metergate.core.plans import CompiledAsset
from metergate.periods import period_window

__all__ = [
    "ALREADY_APPLIED",
    "LOST_DATA",
    "Batch",
    "Command",
    "Entitlement",
    "Flow",
    "Script",
    "check_amount",
]

T = TypeVar("T")

LOST_DATA = "storage lost its data; restore it (AOF) before serving"


@dataclass(frozen=True, slots=True)
class Script:
    """Run one of the Lua scripts with its keys and arguments."""

    name: str
    keys: tuple[str, ...]
    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Command:
    """Run one plain Redis command (reads, and the writes outside any customer's slot)."""

    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Batch:
    """Run plain commands pipelined, without a transaction (on any slots); replies in order."""

    commands: tuple[tuple[str, ...], ...]


Flow = Generator[Script | Command | Batch, Any, T]

KEYED_OP_TTL_S = 86_400
AUTO_OP_TTL_S = 600
LEDGER_LIMIT = 10_000
ALREADY_APPLIED = "this attempt was already applied"


def check_amount(value: object, field: str, *, signed: bool = False, positive: bool = False) -> int:
    """Return `value` if it is a safe integer (of the right sign); raise InvalidAmount otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidAmount(field, f"must be an integer, not {value!r}")
    if abs(value) > MAX_SAFE_INT:
        raise InvalidAmount(field, f"{value} is beyond the safe range of +/-(2^53 - 1)")
    if not signed and value < 0:
        raise InvalidAmount(field, f"must not be negative, got {value}")
    if positive and value <= 0:
        raise InvalidAmount(field, f"must be greater than 0, got {value}")
    return value


def iso(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


@dataclass(slots=True)
class Shape:
    """What every admission of one set of metrics by one customer on one plan sends alike.

    Built once per customer, plan and metric set, so an admission only formats what changes:
    the time, the operation and hold ids, the period and the usage window.
    """

    assets: list[CompiledAsset]
    balances: list[str]
    head: tuple[str, ...]  # operation record (without an id), outbox, customer hash, ledger
    asset_keys: tuple[str, ...]  # per asset: state hash, expiry zset; then per balance the same
    asset_args: list[
        tuple[tuple[str, str], tuple[str, ...]]
    ]  # (metric, kind), (bi, nt, flags, tiers)
    tail: tuple[str, ...]  # open usage windows, closing, holds index
    partition: int
    counts: tuple[str, ...]  # asset count, balance count, balance names
    leases: frozenset[str]  # the UpDownCounter metrics, whose admissions take a lease
    window: tuple[int, str, tuple[str, ...]] = (-1, "", ())  # usage window: start, key, args


@dataclass(slots=True)
class Entitlement:
    """A customer's plan in effect, its period anchor and timezone, and the stored version."""

    plan: str
    anchor: datetime | None
    timezone: str
    version: str
    windows: dict[str, tuple[int, int, tuple[str, ...]]] = field(default_factory=dict)
    shapes: dict[tuple[str, tuple[str, ...]], Shape] = field(default_factory=dict)

    def window(self, period: str, now_s: float) -> tuple[int, int, tuple[str, ...]]:
        """Return the start and end (epoch s) of the period containing `now_s`, and the script
        arguments naming it: start and end in epoch ms, then in RFC 3339."""
        cached = self.windows.get(period)
        if cached is not None and cached[0] <= now_s < cached[1]:
            return cached
        start, end = period_window(period, now_s, anchor=self.anchor, timezone=self.timezone)  # type: ignore[arg-type]
        args = (str(start * 1000), str(end * 1000), iso(start), iso(end))
        window = (start, end, args)
        self.windows[period] = window
        return window


def encode_rid(customer: str, balance: str, nonce: str | None = None) -> str:
    raw = json.dumps([customer, balance, nonce or uuid.uuid4().hex[:16]], separators=(",", ":"))
    return "rsv_" + base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_rid(rid: str) -> tuple[str, str]:
    try:
        body = rid.removeprefix("rsv_")
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        customer, balance, _ = json.loads(raw)
        return str(customer), str(balance)
    except (ValueError, binascii.Error, TypeError) as exc:
        raise NotFound(f"reservation {rid!r} does not exist") from exc


PROBLEM_DETAIL = {
    "asset-suspended": "usage of '{metric}' is suspended",
    "quota-exceeded": "'{metric}' has reached its limit for this period",
    "rate-limited": "'{metric}' is throttled; retry after the given delay",
    "insufficient-credits": "the balance cannot cover the price of this request",
    "balance-suspended": "the balance to charge is suspended",
    "idempotency-conflict": "this idempotency key was used with different parameters",
}
