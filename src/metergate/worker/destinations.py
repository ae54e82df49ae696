"""Where events go: the Destination protocol and Standard Webhooks endpoints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Protocol

import httpx

from metergate.worker.events import OutboxEvent, matches, webhook_body
from metergate.worker.schedule import Outcome, parse_retry_after
from metergate.worker.signing import secret_key, sign_headers

__all__ = [
    "DELIVERY_TIMEOUT_S",
    "Destination",
    "WebhookEndpoint",
    "classify_webhook_response",
    "transport_outcome",
]

DELIVERY_TIMEOUT_S = 15.0
"""How long one attempt may take, connect to last byte (Standard Webhooks: 15 to 30 s)."""
_USER_AGENT = "metergate-webhooks/1"


class Destination(Protocol):
    """Something the worker delivers events to, one attempt at a time."""

    @property
    def id(self) -> str:
        """A stable name for the delivery state and the disabled list (never the secret)."""
        ...

    def wants(self, event: OutboxEvent) -> bool:
        """True if this event is for this destination."""
        ...

    async def send(self, event: OutboxEvent, client: httpx.AsyncClient, now: float) -> Outcome:
        """Make one attempt and say what came of it (never raises for a network failure)."""
        ...


def classify_webhook_response(status: int, headers: Mapping[str, str], now: float) -> Outcome:
    """Read a receiver's answer: 2xx delivered, 410 gone, else retried (honouring Retry-After)."""
    if 200 <= status < 300:
        return Outcome("delivered")
    if status == 410:
        return Outcome("gone", "the receiver answered 410 Gone")
    retry_after = None
    if status in (429, 502, 503, 504):
        retry_after = parse_retry_after(headers.get("retry-after"), now)
    return Outcome("retry", f"the receiver answered {status}", retry_after)


def transport_outcome(exc: httpx.HTTPError) -> Outcome:
    """Turn a failed request (timeout, refused, reset) into a retry."""
    if isinstance(exc, httpx.TimeoutException):
        return Outcome("retry", f"no answer within the timeout ({type(exc).__name__})")
    return Outcome("retry", f"{type(exc).__name__}: {exc}"[:300])


class WebhookEndpoint:
    """A Standard Webhooks endpoint: a URL, its signing secrets and the event types it wants."""

    def __init__(
        self,
        url: str,
        secret: str | Iterable[str],
        events: Iterable[str] = ("*",),
        *,
        timeout_s: float = DELIVERY_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.secrets = [secret] if isinstance(secret, str) else list(secret)
        for s in self.secrets:
            secret_key(s)  # fail now, not at the first delivery
        self.events = tuple(events)
        self.timeout_s = timeout_s
        self._id = "wh_" + hashlib.sha256(url.encode()).hexdigest()[:16]

    @property
    def id(self) -> str:
        """`wh_` and a digest of the URL: stable across restarts and config reordering."""
        return self._id

    def __repr__(self) -> str:
        return f"WebhookEndpoint({self.url!r}, events={list(self.events)!r})"

    def wants(self, event: OutboxEvent) -> bool:
        """True if the event's type matches one of the endpoint's patterns."""
        return matches(self.events, event.type)

    def request(self, event: OutboxEvent, now: float) -> tuple[bytes, dict[str, str]]:
        """Return the body and headers of one attempt (signed at `now`)."""
        body = webhook_body(event)
        headers = sign_headers(event.id, int(now), body, self.secrets)
        headers["content-type"] = "application/json"
        headers["user-agent"] = _USER_AGENT
        return body, headers

    async def send(self, event: OutboxEvent, client: httpx.AsyncClient, now: float) -> Outcome:
        """POST the signed event; 2xx is delivered, 410 disables, anything else is retried."""
        body, headers = self.request(event, now)
        try:
            response = await client.post(
                self.url, content=body, headers=headers, timeout=self.timeout_s
            )
        except httpx.HTTPError as exc:
            return transport_outcome(exc)
        return classify_webhook_response(response.status_code, response.headers, now)
