"""When to try a delivery again, and what one attempt did to a destination's delivery state.

Pure functions over integers: the caller passes the time and the jitter sample, so a test can
replay a whole retry history without a clock or a random generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal

__all__ = [
    "JITTER",
    "MAX_ATTEMPTS",
    "MAX_RETRY_AFTER_S",
    "RETRY_SCHEDULE_S",
    "DeliveryState",
    "Outcome",
    "advance",
    "next_attempt",
    "parse_retry_after",
]

RETRY_SCHEDULE_S: tuple[int, ...] = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
"""The waits after the 1st, 2nd, ... failed attempt (SPEC 5: 5 s, 5 min, 30 min, 2 h ... 24 h)."""
MAX_ATTEMPTS = 1 + len(RETRY_SCHEDULE_S)
"""The first attempt and one per scheduled retry; the event is dead-lettered after the last."""
JITTER = 0.1
"""Each scheduled wait is stretched or shrunk by up to this fraction, so retries spread out."""
MAX_RETRY_AFTER_S = 86_400
"""A receiver's Retry-After is honoured up to one day (the longest scheduled wait)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt came to.

    `delivered`: done. `retry`: try again later (after `retry_after_s` when the receiver said so).
    `reject`: will never succeed as it is (dead-letter it now). `gone`: the receiver answered 410;
    the destination is disabled and the event dead-lettered.
    """

    kind: Literal["delivered", "retry", "reject", "gone"]
    reason: str = ""
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class DeliveryState:
    """One destination's progress with one event: delivered, dead, or waiting for attempt n+1."""

    status: Literal["ok", "dead", "retry"]
    attempts: int = 0
    next_ms: int = 0

    @property
    def final(self) -> bool:
        """True once nothing more will be attempted (delivered or dead-lettered)."""
        return self.status != "retry"

    def encode(self) -> str:
        """Return the stored form: `ok`, `dead` or `retry:<attempts>:<next attempt ms>`."""
        if self.status == "retry":
            return f"retry:{self.attempts}:{self.next_ms}"
        return self.status

    @classmethod
    def decode(cls, text: str) -> DeliveryState:
        """Read the stored form back (raises ValueError on anything else)."""
        if text in ("ok", "dead"):
            return cls(text)  # type: ignore[arg-type]
        kind, attempts, next_ms = text.split(":")
        if kind != "retry":
            raise ValueError(f"not a delivery state: {text!r}")
        return cls("retry", int(attempts), int(next_ms))


def next_attempt(
    attempts: int, now_ms: int, *, jitter: float = 0.5, retry_after_s: float | None = None
) -> int | None:
    """Return when to try again after `attempts` failed attempts (epoch ms), or None when done.

    `jitter` is a sample from [0, 1): 0.5 keeps the scheduled wait, 0 and 1 shorten or lengthen
    it by JITTER. A receiver's `retry_after_s` replaces the scheduled wait (at least 1 s, at most
    MAX_RETRY_AFTER_S), but never adds attempts.
    """
    if attempts < 1:
        raise ValueError("at least one attempt must have failed")
    if attempts >= MAX_ATTEMPTS:
        return None
    if retry_after_s is not None and math.isfinite(retry_after_s):
        wait_s = min(max(retry_after_s, 1.0), MAX_RETRY_AFTER_S)
    else:
        wait_s = RETRY_SCHEDULE_S[attempts - 1] * (1 + JITTER * (2 * jitter - 1))
    return now_ms + round(wait_s * 1000)


def advance(
    state: DeliveryState | None, outcome: Outcome, now_ms: int, *, jitter: float = 0.5
) -> tuple[DeliveryState, str]:
    """Apply one attempt's outcome; return the new state and, when it became dead, why."""
    attempts = (state.attempts if state else 0) + 1
    if outcome.kind == "delivered":
        return DeliveryState("ok", attempts), ""
    if outcome.kind in ("reject", "gone"):
        return DeliveryState("dead", attempts), outcome.reason
    at = next_attempt(attempts, now_ms, jitter=jitter, retry_after_s=outcome.retry_after_s)
    if at is None:
        reason = f"gave up after {attempts} attempts: {outcome.reason}"
        return DeliveryState("dead", attempts), reason
    return DeliveryState("retry", attempts, at), ""


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Read a Retry-After field (delay-seconds or an HTTP-date) as seconds from `now`, or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)
