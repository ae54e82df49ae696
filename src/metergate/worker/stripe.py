"""The Stripe adapter: `usage.reported` events become Stripe billing meter events.

One `POST /v1/billing/meter_events` per event, form-encoded, with `identifier` = the event id
(deterministic for customer, metric and window), so a retried or redelivered report is one meter
event at Stripe. Like Stripe's own libraries, each request carries an `Idempotency-Key` (the event
id again) and pins its API version with `Stripe-Version`. Stripe enforces identifier uniqueness for at least 24 hours only: a report older
than `max_age_s` is dead-lettered instead of being sent, because a resend after the window might
count twice if an earlier attempt did land.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from metergate.config import STRIPE_API_VERSION
from metergate.worker.destinations import DELIVERY_TIMEOUT_S, transport_outcome
from metergate.worker.events import OutboxEvent
from metergate.worker.schedule import Outcome, parse_retry_after

__all__ = ["StripeMeter", "StripeMeterEvents", "classify_stripe_response", "meter_event_form"]

_IDENTIFIER_MAX = 100
_IDEMPOTENCY_KEY_MAX = 255
_DAY_S = 86_400


@dataclass(frozen=True, slots=True)
class StripeMeter:
    """A Stripe meter: its `event_name` and the payload keys of the customer and the value."""

    event_name: str
    customer_key: str = "stripe_customer_id"
    value_key: str = "value"


def _identifier(event_id: str) -> str:
    """The event id, or a digest of it when it is longer than Stripe's 100 characters."""
    if len(event_id) <= _IDENTIFIER_MAX:
        return event_id
    return "usage:" + hashlib.sha256(event_id.encode()).hexdigest()


def _epoch_s(rfc3339: Any) -> int | None:
    if not isinstance(rfc3339, str) or not rfc3339:
        return None
    try:
        return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None


def meter_event_form(
    event: OutboxEvent,
    meter: str | StripeMeter,
    stripe_customer: str,
    value_field: str = "quantity",
) -> dict[str, str]:
    """Return the form fields of the meter event for one `usage.reported` event.

    The timestamp is the window's start, or the period's start when the window began before it,
    so the usage lands in the billing period it belongs to.
    """
    value = event.data.get(value_field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"data.{value_field} is not an integer")
    starts = [
        t for t in (_epoch_s(event.data.get(k)) for k in ("window_start", "period_start")) if t
    ]
    timestamp = max(starts) if starts else event.time_ms // 1000
    if isinstance(meter, str):
        meter = StripeMeter(meter)
    return {
        "event_name": meter.event_name,
        f"payload[{meter.customer_key}]": stripe_customer,
        f"payload[{meter.value_key}]": str(value),
        "identifier": _identifier(event.id),
        "timestamp": str(timestamp),
    }


def classify_stripe_response(
    status: int, headers: Mapping[str, str], body: bytes, now: float
) -> Outcome:
    """Read Stripe's answer: 2xx (or a duplicate identifier) delivered; 429, 5xx, 409 lock
    timeouts and 409 idempotency keys in use retried; any other 4xx rejected (it would fail the
    same way again)."""
    if 200 <= status < 300:
        return Outcome("delivered")
    error: dict[str, Any] = {}
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            error = parsed["error"]
    except ValueError:
        pass
    code = str(error.get("code") or "")
    message = str(error.get("message") or "")
    reason = (
        f"Stripe answered {status}"
        + (f" {code}" if code else "")
        + (f": {message}" if message else "")
    )
    if status == 400 and (
        code == "duplicate_meter_event" or "already exists with identifier" in message
    ):
        # The identifier is the event id: Stripe holding it proves an earlier attempt landed.
        return Outcome("delivered", "duplicate identifier: already recorded")
    should_retry = headers.get("stripe-should-retry")
    # 409 idempotency_key_in_use: an earlier attempt with this Idempotency-Key is still running
    retryable = (
        status == 429
        or status >= 500
        or (status == 409 and code in ("lock_timeout", "idempotency_key_in_use"))
    )
    if should_retry == "false" or (should_retry != "true" and not retryable):
        return Outcome("reject", reason[:500])
    return Outcome("retry", reason[:500], parse_retry_after(headers.get("retry-after"), now))


class StripeMeterEvents:
    """Send `usage.reported` events to Stripe as billing meter events.

    `customer_map` maps metergate customers to Stripe customer ids (`cus_...`); `event_names` maps
    metrics to the `event_name` of their Stripe meter (or a StripeMeter naming its payload keys). Reports of other metrics are not for this
    destination; a report for a customer with no Stripe id is dead-lettered.
    """

    id = "stripe"

    def __init__(
        self,
        api_key: str,
        customer_map: Mapping[str, str],
        event_names: Mapping[str, str | StripeMeter],
        base_url: str = "https://api.stripe.com",
        *,
        value_field: str = "quantity",
        max_age_s: float = 23 * 3600,
        timeout_s: float = DELIVERY_TIMEOUT_S,
        stripe_version: str | None = STRIPE_API_VERSION,
    ) -> None:
        if not api_key:
            raise ValueError("the Stripe API key must not be empty")
        self._api_key = api_key
        self.customer_map = dict(customer_map)
        self.event_names = dict(event_names)
        self.url = base_url.rstrip("/") + "/v1/billing/meter_events"
        self.value_field = value_field
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self.stripe_version = stripe_version

    def __repr__(self) -> str:
        return f"StripeMeterEvents({self.url!r}, metrics={sorted(self.event_names)!r})"

    def wants(self, event: OutboxEvent) -> bool:
        """True for `usage.reported` events of a metric that has a Stripe meter."""
        return event.type == "usage.reported" and event.data.get("metric") in self.event_names

    async def send(self, event: OutboxEvent, client: httpx.AsyncClient, now: float) -> Outcome:
        """POST one meter event; see classify_stripe_response for what is retried."""
        stripe_customer = self.customer_map.get(event.customer)
        if not stripe_customer:
            return Outcome("reject", f"no Stripe customer is mapped for '{event.customer}'")
        if now - event.time_ms / 1000 > self.max_age_s:
            return Outcome(
                "reject",
                f"older than {self.max_age_s:.0f} s: past Stripe's identifier deduplication, "
                "a resend might count twice",
            )
        metric = str(event.data.get("metric"))
        try:
            form = meter_event_form(
                event, self.event_names[metric], stripe_customer, self.value_field
            )
        except ValueError as exc:
            return Outcome("reject", str(exc))
        if now - int(form["timestamp"]) > 35 * _DAY_S:
            return Outcome("reject", "Stripe only accepts meter events of the past 35 days")
        key = event.id if len(event.id) <= _IDEMPOTENCY_KEY_MAX else form["identifier"]
        headers = {"authorization": f"Bearer {self._api_key}", "idempotency-key": key}
        if self.stripe_version:
            headers["stripe-version"] = self.stripe_version
        try:
            response = await client.post(
                self.url, data=form, headers=headers, timeout=self.timeout_s
            )
        except httpx.HTTPError as exc:
            return transport_outcome(exc)
        return classify_stripe_response(
            response.status_code, response.headers, response.content, now
        )
