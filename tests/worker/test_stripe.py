"""The Stripe adapter against a fake Stripe API that records requests and answers as told."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from urllib.parse import parse_qs

import httpx
import pytest

from conftest import Clock
from metergate.storage import AsyncStorage
from metergate.worker import StripeMeterEvents, Worker
from metergate.worker.events import OutboxEvent
from metergate.worker.keys import WorkerKeys
from metergate.worker.reports import window_of
from metergate.worker.stripe import classify_stripe_response, meter_event_form

from .conftest import Recorder, Server, gateway, run, serving
from .test_reports import KEYS, METRICS, record_usage

NOW = 1_800_000_000.0
WINDOW_S = 1_799_999_940


@pytest.fixture
def fake_stripe() -> Iterator[tuple[Recorder, Server]]:
    """A fake Stripe API answering 200 with a meter event unless told otherwise."""
    recorder = Recorder(default=(200, {"content-type": "application/json"}, b'{"object": "x"}'))
    with serving(recorder.app()) as server:
        yield recorder, server


def report(customer: str = "acme", metric: str = "calls", quantity: int = 7) -> OutboxEvent:
    """A `usage.reported` event as report.lua writes it."""
    return OutboxEvent(
        stream_id="1-0",
        partition=0,
        id=f"usage:{customer}:{metric}:{WINDOW_S}",
        type="usage.reported",
        customer=customer,
        time_ms=int(NOW * 1000),
        data={
            "customer": customer,
            "metric": metric,
            "window_start": "2027-01-15T07:59:00Z",
            "window_end": "2027-01-15T08:00:00Z",
            "quantity": quantity,
            "overage_quantity": 0,
            "credits_charged": 0,
            "period_start": "2027-01-01T00:00:00Z",
            "seq": 3,
        },
    )


def adapter(server: Server) -> StripeMeterEvents:
    return StripeMeterEvents(
        "sk_test_123", {"acme": "cus_ACME"}, {"calls": "api_calls"}, base_url=server.url
    )


async def send(stripe: StripeMeterEvents, event: OutboxEvent) -> str:
    async with httpx.AsyncClient() as http:
        return (await stripe.send(event, http, NOW)).kind


def test_meter_event_is_form_encoded_with_the_event_id(
    fake_stripe: tuple[Recorder, Server],
) -> None:
    """A report becomes POST /v1/billing/meter_events, form-encoded, identifier = event id."""
    recorder, server = fake_stripe
    assert asyncio.run(send(adapter(server), report())) == "delivered"
    (request,) = recorder.requests
    assert request.path == "/v1/billing/meter_events"
    assert request.headers["authorization"] == "Bearer sk_test_123"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
    assert form == {
        "event_name": "api_calls",
        "payload[stripe_customer_id]": "cus_ACME",
        "payload[value]": "7",
        "identifier": f"usage:acme:calls:{WINDOW_S}",
        "timestamp": str(WINDOW_S),
    }


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind"),
    [
        (429, {"error": {"type": "rate_limit_error"}}, {}, "retry"),
        (500, {"error": {"type": "api_error"}}, {}, "retry"),
        (409, {"error": {"code": "lock_timeout", "type": "invalid_request_error"}}, {}, "retry"),
        (409, {"error": {"code": "idempotency_key_in_use"}}, {}, "retry"),
        (400, {"error": {"type": "idempotency_error"}}, {}, "reject"),
        (400, {"error": {"code": "parameter_missing", "message": "no"}}, {}, "reject"),
        (
            400,
            {"error": {"message": "An event already exists with identifier usage:acme:calls:1."}},
            {},
            "delivered",
        ),
        (404, {"error": {"code": "resource_missing"}}, {}, "reject"),
        (400, {"error": {"code": "x"}}, {"stripe-should-retry": "true"}, "retry"),
        (503, {"error": {"code": "x"}}, {"stripe-should-retry": "false"}, "reject"),
    ],
)
def test_stripe_answers_are_classified(
    status: int, body: dict[str, object], headers: dict[str, str], kind: str
) -> None:
    """429, 5xx, 409 lock timeouts and keys in use retry; other 4xx reject; a duplicate identifier
    is delivered."""
    outcome = classify_stripe_response(status, headers, json.dumps(body).encode(), NOW)
    assert outcome.kind == kind


def test_unmapped_customers_long_ids_and_old_reports() -> None:
    """No Stripe customer or a report past the dedup window rejects; long ids are digested."""
    stripe = StripeMeterEvents("sk", {"acme": "cus_A", "x" * 120: "cus_X"}, {"calls": "api_calls"})
    assert asyncio.run(send(stripe, report(customer="nobody"))) == "reject"
    old = dataclasses.replace(report(), time_ms=int(NOW * 1000) - 24 * 3_600_000)
    assert asyncio.run(send(stripe, old)) == "reject"
    assert not stripe.wants(report(metric="tokens"))
    form = meter_event_form(report(customer="x" * 120), "api_calls", "cus_X")
    assert len(form["identifier"]) <= 100
    assert (
        form["identifier"] == meter_event_form(report(customer="x" * 120), "e", "c")["identifier"]
    )


def test_worker_sends_reports_to_stripe_and_retries_then_dead_letters(
    storage_url: str, clock: Clock, fake_stripe: tuple[Recorder, Server]
) -> None:
    """Reports reach Stripe once; a 500 is retried under the same identifier; a 400 dead-letters."""
    recorder, server = fake_stripe
    config = gateway(storage_url, [], metrics=METRICS)
    now_ms = int(clock() * 1000)
    start, end = window_of(now_ms, 60_000)
    recorder.answer(500, {}, {"error": {"type": "api_error"}})

    async def scenario(storage: AsyncStorage) -> None:
        stripe = StripeMeterEvents(
            "sk_test", {"acme": "cus_A", "bob": "cus_B"}, {"calls": "api_calls"}, server.url
        )
        await record_usage(storage, "acme", "calls", now_ms, 5)
        async with httpx.AsyncClient() as http:
            worker = Worker(config, storage, clock, http, extra_destinations=[stripe])
            clock.now = end / 1000 + 10
            first = await worker.run_once()
            assert (first.reported, first.retrying) == (1, 1)
            clock.advance(10)
            assert (await worker.run_once()).delivered == 1
            recorder.answer(400, {}, {"error": {"code": "parameter_invalid_integer"}})
            await record_usage(storage, "bob", "calls", int(clock() * 1000), 3)
            clock.advance(120)
            assert (await worker.run_once()).dead_lettered == 1
        forms = [parse_qs(r.body.decode()) for r in recorder.requests]
        identifiers = [f["identifier"][0] for f in forms]
        assert identifiers[0] == identifiers[1] == f"usage:acme:calls:{start // 1000}"
        assert identifiers[2].startswith("usage:bob:calls:")
        letters = []
        keys = WorkerKeys(KEYS.keys)
        for p in range(4):
            letters += [f for _, f in await storage.client.xrange(keys.dead_letters(p))]
        assert [(d["destination"], d["customer"]) for d in letters] == [("stripe", "bob")]
        assert "parameter_invalid_integer" in letters[0]["reason"]

    run(scenario, storage_url)
