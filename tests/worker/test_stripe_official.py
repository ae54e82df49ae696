"""Our meter-event request against the one the official `stripe` package sends for the same event."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl

import pytest
import stripe

from metergate import ConfigError, parse_config
from metergate.config import STRIPE_API_VERSION
from metergate.worker.entry import stripe_destinations
from metergate.worker.stripe import StripeMeter, StripeMeterEvents, meter_event_form

from .conftest import Received, Recorder, Server
from .test_reports import METRICS
from .test_stripe import fake_stripe, report, send

__all__ = ["fake_stripe"]

STANDARD_HEADERS = ("authorization", "content-type", "idempotency-key", "stripe-version")


def official(server: Server, form: dict[str, str], idempotency_key: str) -> None:
    """Send the same meter event with stripe-python, the way its documentation shows."""
    payload = {
        key.removeprefix("payload[").removesuffix("]"): value
        for key, value in form.items()
        if key.startswith("payload[")
    }
    client = stripe.StripeClient(
        "sk_test_123",
        base_addresses={"api": server.url},
        stripe_version=STRIPE_API_VERSION,
        max_network_retries=0,
    )
    client.v1.billing.meter_events.create(
        params={
            "event_name": form["event_name"],
            "payload": payload,
            "identifier": form["identifier"],
            "timestamp": int(form["timestamp"]),
        },
        options={"idempotency_key": idempotency_key},
    )


def _compare(ours: Received, theirs: Received) -> None:
    assert ours.path == theirs.path == "/v1/billing/meter_events"
    assert parse_qsl(ours.body.decode(), strict_parsing=True) == parse_qsl(
        theirs.body.decode(), strict_parsing=True
    )
    for name in STANDARD_HEADERS:
        assert ours.headers.get(name) == theirs.headers.get(name), name


@pytest.mark.parametrize(
    "meter", ["api_calls", StripeMeter("llm_tokens", customer_key="customer", value_key="tokens")]
)
def test_our_request_is_the_one_stripe_python_sends(
    fake_stripe: tuple[Recorder, Server], meter: str | StripeMeter
) -> None:
    """Same path, same form fields in the same order, same Authorization, Content-Type,
    Idempotency-Key (the event id) and Stripe-Version (pinned)."""
    recorder, server = fake_stripe
    event = report()
    ours = StripeMeterEvents("sk_test_123", {"acme": "cus_ACME"}, {"calls": meter}, server.url)
    assert asyncio.run(send(ours, event)) == "delivered"
    official(server, meter_event_form(event, meter, "cus_ACME"), event.id)
    mine, theirs = recorder.requests
    _compare(mine, theirs)
    assert mine.headers["idempotency-key"] == event.id
    assert mine.headers["stripe-version"] == STRIPE_API_VERSION


def test_a_meter_may_name_its_payload_keys_and_the_version_is_pinned(
    fake_stripe: tuple[Recorder, Server],
) -> None:
    """`stripe.meters.calls: {event_name, customer_key, value_key}` and `stripe.api_version`
    reach the request; the short form still works beside it."""
    recorder, server = fake_stripe
    config = parse_config(
        {
            "metrics": {**METRICS, "tokens": {"type": "CumulativeCounter"}},
            "stripe": {
                "api_key": "sk_test_123",
                "api_version": "2025-03-31.basil",
                "base_url": server.url,
                "customers": {"acme": "cus_ACME"},
                "meters": {
                    "calls": {"event_name": "llm_calls", "customer_key": "cust", "value_key": "n"},
                    "tokens": "llm_tokens",
                },
            },
        }
    )
    (destination,) = stripe_destinations(config)
    assert isinstance(destination, StripeMeterEvents)
    assert asyncio.run(send(destination, report())) == "delivered"
    assert asyncio.run(send(destination, report(metric="tokens"))) == "delivered"
    named, short = (dict(parse_qsl(r.body.decode())) for r in recorder.requests)
    assert (named["event_name"], named["payload[cust]"], named["payload[n]"]) == (
        "llm_calls",
        "cus_ACME",
        "7",
    )
    assert (short["event_name"], short["payload[stripe_customer_id]"]) == ("llm_tokens", "cus_ACME")
    assert {r.headers["stripe-version"] for r in recorder.requests} == {"2025-03-31.basil"}


def test_a_named_meter_needs_its_event_name() -> None:
    """A meter object without `event_name`, or with an unknown key, is an error naming its path."""
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "metrics": METRICS,
                "stripe": {"api_key": "k", "meters": {"calls": {"value_key": "v", "x": 1}}},
            }
        )
    assert info.value.errors == [
        ("stripe.meters.calls.event_name", "is required"),
        ("stripe.meters.calls.x", "unknown key 'x'"),
    ]
