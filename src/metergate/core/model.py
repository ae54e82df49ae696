"""What a decision says: per-asset usage, balances, and the Decision an admission returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["AssetUsage", "BalanceState", "Decision", "Throttle", "Ticket"]


@dataclass(frozen=True, slots=True)
class Throttle:
    """A RateLimit tier's throttle as it stands: `limit` units per `per_s` seconds, `remaining` now."""

    limit: int
    per_s: int
    remaining: int


@dataclass(frozen=True, slots=True)
class AssetUsage:
    """One monitored asset after (or, when refused, without) the admission."""

    metric: str
    value: int
    pending: int
    level: str
    policy: str
    limit: int | None
    remaining: int | None
    overage: int
    suspended: bool
    period_start: int | None
    period_end: int | None
    throttle: Throttle | None = None
    concurrent: bool = False
    """An UpDownCounter: its limit counts units in flight at once, not units per period."""

    def as_dict(self) -> dict[str, object]:
        """Return the fields of `GET /v1/customers/{id}/usage` for this metric."""
        return {
            "value": self.value,
            "pending": self.pending,
            "level": self.level,
            "policy": self.policy,
            "period_start": self.period_start,
            "period_end": self.period_end,
            "limit": self.limit,
            "remaining": self.remaining,
            "overage": self.overage,
            "suspended": self.suspended,
        }


@dataclass(frozen=True, slots=True)
class BalanceState:
    """A prepaid balance: `available = amount - held`, never below `-overage` through admissions."""

    name: str
    amount: int
    held: int
    available: int
    overage: int
    unit: str
    suspended: bool
    low_at: int | None = None

    def as_dict(self) -> dict[str, object]:
        """Return the fields of `GET /v1/customers/{id}/balances/{name}`."""
        return {
            "amount": self.amount,
            "held": self.held,
            "available": self.available,
            "overage": self.overage,
            "unit": self.unit,
            "suspended": self.suspended,
            "low_at": self.low_at,
        }


@dataclass(frozen=True, slots=True)
class Ticket:
    """What an admission left open: the hold and lease id, the metrics to settle or end, and the
    attempt id that refunds it."""

    customer: str
    plan: str
    hold_id: str
    estimated: Mapping[str, int]
    leased: Mapping[str, int]
    attempt: str = ""
    """The admission's attempt id: what a refund names."""
    operation: str = ""
    """The operation id of a keyed admission ('' without one)."""
    requests: int = 0
    """For an allowance's hold: the number of requests it holds."""
    held: Mapping[str, int] = field(default_factory=dict)
    """For an allowance's hold: the credits it holds, per balance."""
    allowance: object | None = None
    """For a request admitted in process: the local allowance it came from (what settles or
    refunds it); for an allowance's own hold, None."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one admission: allowed or refused with a status and problem slug."""

    allowed: bool
    status: int
    problem: str | None
    customer: str
    level: str | None = None
    retry_after: int | None = None
    metric: str | None = None
    detail: str | None = None
    assets: Mapping[str, AssetUsage] = field(default_factory=dict)
    balances: Mapping[str, int] = field(default_factory=dict)
    """Per balance charged or held: `available` after the admission."""
    ticket: Ticket | None = field(default=None, compare=False)
    """What to settle or refund: a handle, not part of the outcome."""
    degraded: bool = False
    refused_by: tuple[str, str] | None = None
    """For a refusal by a tier: the (level, policy) of the tier that refused."""
