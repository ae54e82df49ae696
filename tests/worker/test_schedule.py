"""The pure parts of delivery: retry schedule, state transitions, rendering, classification."""

from __future__ import annotations

import json

import pytest

from metergate.worker.destinations import WebhookEndpoint, classify_webhook_response
from metergate.worker.events import matches, parse_entry, rfc3339, webhook_body
from metergate.worker.schedule import (
    MAX_ATTEMPTS,
    RETRY_SCHEDULE_S,
    DeliveryState,
    Outcome,
    advance,
    next_attempt,
    parse_retry_after,
)
from metergate.worker.signing import verify

from .conftest import SECRET

NOW_MS = 1_800_000_000_000


def test_schedule_is_the_spec_schedule() -> None:
    """Without jitter the waits are 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h."""
    assert RETRY_SCHEDULE_S == (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    waits = [(next_attempt(n, NOW_MS) or 0) - NOW_MS for n in range(1, MAX_ATTEMPTS)]
    assert waits == [s * 1000 for s in RETRY_SCHEDULE_S]
    assert next_attempt(MAX_ATTEMPTS, NOW_MS) is None


@pytest.mark.parametrize("sample", [0.0, 0.25, 0.999])
def test_jitter_stays_within_ten_percent(sample: float) -> None:
    """A jitter sample moves each wait by at most 10 % either way."""
    for n, base in enumerate(RETRY_SCHEDULE_S, start=1):
        wait = (next_attempt(n, NOW_MS, jitter=sample) or 0) - NOW_MS
        assert 0.9 * base * 1000 <= wait <= 1.1 * base * 1000


def test_retry_after_replaces_the_wait_within_bounds() -> None:
    """A receiver's Retry-After sets the wait (at least 1 s, at most a day)."""
    assert next_attempt(1, NOW_MS, retry_after_s=120) == NOW_MS + 120_000
    assert next_attempt(1, NOW_MS, retry_after_s=0) == NOW_MS + 1000
    assert next_attempt(1, NOW_MS, retry_after_s=10**9) == NOW_MS + 86_400_000
    assert next_attempt(MAX_ATTEMPTS, NOW_MS, retry_after_s=5) is None


def test_advance_walks_to_dead_after_the_last_attempt() -> None:
    """Ten failed attempts in a row end dead, with the last failure's reason."""
    state: DeliveryState | None = None
    now = NOW_MS
    for _ in range(MAX_ATTEMPTS - 1):
        state, reason = advance(state, Outcome("retry", "503"), now)
        assert state.status == "retry" and not reason
        now = state.next_ms
    state, reason = advance(state, Outcome("retry", "503"), now)
    assert state == DeliveryState("dead", MAX_ATTEMPTS)
    assert reason == f"gave up after {MAX_ATTEMPTS} attempts: 503"
    assert advance(None, Outcome("gone", "410"), now) == (DeliveryState("dead", 1), "410")
    assert advance(None, Outcome("delivered"), now)[0].status == "ok"


def test_delivery_state_round_trips() -> None:
    """States encode to `ok`, `dead`, `retry:n:ms` and decode back."""
    for state in (DeliveryState("ok"), DeliveryState("dead"), DeliveryState("retry", 3, 42)):
        assert DeliveryState.decode(state.encode()) == state
    with pytest.raises(ValueError):
        DeliveryState.decode("later:1:2")


def test_parse_retry_after() -> None:
    """Retry-After is read as delay-seconds or an HTTP-date; anything else is ignored."""
    assert parse_retry_after("120", 0) == 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480 - 60) == 60
    assert parse_retry_after("soon", 0) is None
    assert parse_retry_after(None, 0) is None


def test_webhook_body_and_headers() -> None:
    """The body is {type, timestamp (RFC 3339), data}; headers carry the event id and verify."""
    fields = {
        "id": "evt_acme_7",
        "type": "balance.low",
        "customer": "acme",
        "time": str(NOW_MS + 5),
        "data": '{"customer":"acme","balance":"credits","amount":9007199254740991,"seq":7}',
    }
    event = parse_entry("1-0", fields, 3)
    assert event.error is None and event.partition == 3
    body = json.loads(webhook_body(event))
    assert body == {
        "type": "balance.low",
        "timestamp": "2027-01-15T08:00:00.005Z",
        "data": {"customer": "acme", "balance": "credits", "amount": 2**53 - 1, "seq": 7},
    }
    endpoint = WebhookEndpoint("http://x/hook", SECRET, ["balance.*"])
    raw, headers = endpoint.request(event, NOW_MS / 1000)
    assert headers["webhook-id"] == "evt_acme_7"
    assert headers["webhook-timestamp"] == str(NOW_MS // 1000)
    assert verify(raw, headers, SECRET, now=NOW_MS / 1000)["data"]["seq"] == 7


def test_malformed_entries_are_flagged() -> None:
    """An entry without an id or with data that is not a JSON object carries an error."""
    assert parse_entry("1-0", {"type": "t", "data": "{}"}, 0).error
    assert parse_entry("1-0", {"id": "e", "type": "t", "data": "[1]"}, 0).error
    assert parse_entry("1-0", {"id": "e", "type": "t", "data": "{"}, 0).error


def test_rfc3339_and_patterns() -> None:
    """Timestamps are UTC with milliseconds; event patterns are shell-style."""
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(951_782_400_123) == "2000-02-29T00:00:00.123Z"
    assert matches(["quota.*"], "quota.level_changed")
    assert not matches(["quota.*"], "quotas.x")
    assert matches(["usage.reported", "period.closed"], "period.closed")
    assert matches(["*"], "anything")


@pytest.mark.parametrize(
    ("status", "headers", "kind", "after"),
    [
        (200, {}, "delivered", None),
        (204, {}, "delivered", None),
        (410, {}, "gone", None),
        (429, {"retry-after": "30"}, "retry", 30.0),
        (503, {"retry-after": "7"}, "retry", 7.0),
        (500, {"retry-after": "7"}, "retry", None),
        (400, {}, "retry", None),
        (301, {}, "retry", None),
    ],
)
def test_classify_webhook_response(
    status: int, headers: dict[str, str], kind: str, after: float | None
) -> None:
    """2xx delivers, 410 disables, anything else retries; Retry-After counts on 429/502/503/504."""
    outcome = classify_webhook_response(status, headers, 0)
    assert outcome.kind == kind
    assert outcome.retry_after_s == after
