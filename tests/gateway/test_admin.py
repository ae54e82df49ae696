"""The admin API over HTTP, on every backend, with the proxy using what it changes at once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.adapters.harness import serve_asgi
from tests.gateway.openapi_check import checked_client
from tests.gateway.test_proxy import UPSTREAM, gateway_config

from conftest import Clock, with_storage
from metergate import Meter, create_app
from metergate.admin import admin_app

TOKEN = "admin-token-0123456789"


@pytest.fixture
def admin(storage_url: str, clock: Clock) -> Iterator[tuple[httpx.Client, str]]:
    """The admin API and the proxy over the same storage; yields an authorized client (each of its
    responses validated against the served OpenAPI document) and the proxy URL."""
    with serve_asgi(UPSTREAM) as upstream:
        config = with_storage(gateway_config(upstream), storage_url)
        config["admin"] = {"token": TOKEN}
        with (
            serve_asgi(admin_app(config)) as admin_url,
            serve_asgi(create_app(config, clock=clock)) as proxy,
        ):
            client = checked_client(admin_url, TOKEN)
            yield client, proxy
            client.close()


def problem_type(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/problem+json"
    return str(response.json()["type"]).rsplit(":", 1)[-1]


def test_every_call_but_healthz_needs_the_token(admin: tuple[httpx.Client, str]) -> None:
    """Without the bearer token the API answers 401 (/metrics too); /healthz answers without it."""
    client, _ = admin
    anonymous = httpx.Client(base_url=str(client.base_url), event_hooks=client.event_hooks)
    assert anonymous.get("/v1/customers/c").status_code == 401
    assert (
        anonymous.get("/v1/customers/c", headers={"Authorization": "Bearer wrong"}).status_code
        == 401
    )
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/metrics").status_code == 401
    anonymous.close()


def test_runtime_customer_and_key_work_through_the_proxy_at_once(
    admin: tuple[httpx.Client, str],
) -> None:
    """A customer created and given a key at runtime is metered by the proxy on its next request."""
    client, proxy = admin
    r = client.put(
        "/v1/customers/newco",
        json={"entitlement": {"plan": "p"}, "balances": {"credits": {"amount": 50}}},
    )
    assert r.status_code == 200
    issued = client.post("/v1/customers/newco/api-keys")
    assert issued.status_code == 201
    key = issued.json()["key"]
    assert httpx.get(f"{proxy}/v1/x", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    usage = client.get("/v1/customers/newco/usage").json()
    assert usage["metrics"]["calls"]["value"] == 1
    revoked = client.delete(f"/v1/customers/newco/api-keys/{issued.json()['id']}")
    assert revoked.status_code == 204


def test_bad_input_is_422_naming_the_field_and_changes_nothing(
    admin: tuple[httpx.Client, str],
) -> None:
    """A float amount is refused with 422 invalid-request naming `amount`; the balance is unchanged."""
    client, _ = admin
    before = client.get("/v1/customers/c/balances/credits").json()
    for bad in (5.5, "5", -3, None):
        r = client.post("/v1/customers/c/balances/credits/topup", json={"amount": bad})
        assert r.status_code == 422
        assert problem_type(r) == "invalid-request"
        assert r.json()["errors"][0]["field"] == "amount"
    assert client.get("/v1/customers/c/balances/credits").json() == before


def test_idempotency_key_replays_a_topup(admin: tuple[httpx.Client, str]) -> None:
    """The same Idempotency-Key tops up once; with another body it is a 409 conflict."""
    client, _ = admin
    headers = {"Idempotency-Key": "inv-1"}
    first = client.post(
        "/v1/customers/c/balances/credits/topup", json={"amount": 5}, headers=headers
    )
    again = client.post(
        "/v1/customers/c/balances/credits/topup", json={"amount": 5}, headers=headers
    )
    assert first.json() == again.json()
    assert first.json()["amount"] == 10_005
    other = client.post(
        "/v1/customers/c/balances/credits/topup", json={"amount": 6}, headers=headers
    )
    assert other.status_code == 409
    assert problem_type(other) == "idempotency-conflict"


def test_reservation_lifecycle(admin: tuple[httpx.Client, str]) -> None:
    """Reserve, commit less than held, and a second commit is a conflict."""
    client, _ = admin
    r = client.post(
        "/v1/customers/c/balances/credits/reservations", json={"amount": 100, "ttl_s": 60}
    )
    assert r.status_code == 201
    rid = r.json()["id"]
    assert client.get("/v1/customers/c/balances/credits").json()["held"] == 100
    committed = client.post(f"/v1/reservations/{rid}/commit", json={"amount": 40})
    assert committed.status_code == 200
    assert (committed.json()["amount"], committed.json()["held"]) == (9_960, 0)
    assert client.post(f"/v1/reservations/{rid}/release").status_code == 409


def test_withdraw_below_zero_is_409(admin: tuple[httpx.Client, str]) -> None:
    """A withdrawal larger than what is available is refused with 409 insufficient-credits."""
    client, _ = admin
    r = client.post("/v1/customers/c/balances/credits/withdraw", json={"amount": 10_001})
    assert r.status_code == 409
    assert problem_type(r) == "insufficient-credits"


def test_asset_suspend_and_resume_reach_the_proxy(admin: tuple[httpx.Client, str]) -> None:
    """Suspending an asset makes the proxy answer 403 asset-suspended; resuming lets it through."""
    client, proxy = admin
    headers = {"Authorization": "Bearer gw-key"}
    assert client.post("/v1/customers/c/assets/calls/suspend").json()["suspended"] is True
    r = httpx.get(f"{proxy}/v1/x", headers=headers)
    assert (r.status_code, problem_type(r)) == (403, "asset-suspended")
    client.post("/v1/customers/c/assets/calls/resume")
    assert httpx.get(f"{proxy}/v1/x", headers=headers).status_code == 200


def test_usage_record_ledger_and_events(admin: tuple[httpx.Client, str]) -> None:
    """POST usage records a value; the ledger and the outbox list what happened."""
    client, _ = admin
    r = client.post("/v1/customers/c/usage", json={"metric": "calls", "value": 3})
    assert r.status_code == 200 and r.json()["value"] == 3
    client.post("/v1/customers/c/balances/credits/topup", json={"amount": 7})
    entries = client.get("/v1/customers/c/ledger").json()["entries"]
    assert [e["kind"] for e in entries] == ["topup", "initial"]
    events: list[dict[str, Any]] = client.get("/v1/events").json()["events"]
    assert events[0]["type"] == "balance.topped_up"
    redelivered = client.post(f"/v1/events/{events[0]['id']}/redeliver")
    assert redelivered.status_code == 202


def test_unknown_things_are_404(admin: tuple[httpx.Client, str]) -> None:
    """Unknown customers, balances and reservations answer 404 not-found."""
    client, _ = admin
    assert problem_type(client.get("/v1/customers/nobody")) == "not-found"
    assert problem_type(client.get("/v1/customers/c/balances/nothing")) == "not-found"
    assert problem_type(client.post("/v1/reservations/rsv_bogus/release")) == "not-found"


def test_openapi_lists_every_endpoint(admin: tuple[httpx.Client, str]) -> None:
    """The OpenAPI document is served and names the admin paths."""
    client, _ = admin
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/customers/{id}",
        "/v1/customers/{id}/balances/{name}/topup",
        "/v1/reservations/{rid}/commit",
        "/v1/events",
    ):
        assert path in paths


def test_metrics_are_prometheus_text(admin: tuple[httpx.Client, str]) -> None:
    """/metrics answers Prometheus text counting admissions by outcome, with decision latency."""
    client, proxy = admin
    assert httpx.get(f"{proxy}/v1/x", headers={"Authorization": "Bearer gw-key"}).status_code == 200
    r = client.get("/metrics")
    assert r.status_code == 200
    assert 'metergate_admissions_total{outcome="allowed"}' in r.text
    assert "metergate_decision_seconds_bucket" in r.text


def test_dead_letters_are_listed_and_redelivered_to_their_destination(
    admin: tuple[httpx.Client, str], storage_url: str
) -> None:
    """A dead letter shows in /v1/events as dead; redelivering it re-queues it for that endpoint only."""
    client, _ = admin
    client.post("/v1/customers/c/balances/credits/topup", json={"amount": 3})
    queued = client.get("/v1/events").json()["events"][0]
    meter = Meter(with_storage(gateway_config("http://127.0.0.1:9"), storage_url))
    keys = meter.core.keys
    partition = keys.partition("c")
    redis_client = meter.storage.client
    ((stream_id, fields),) = redis_client.xrange(keys.outbox(partition), "-", "+")
    redis_client.xadd(
        keys.dead_letters(partition),
        {
            **fields,
            "destination": "wh_abc",
            "reason": "HTTP 500",
            "source": stream_id,
            "dead_at": "1",
        },
    )
    listed = client.get("/v1/events").json()["events"]
    dead = [e for e in listed if e["status"] == "dead"]
    assert [(e["id"], e["destination"], e["reason"]) for e in dead] == [
        (queued["id"], "wh_abc", "HTTP 500")
    ]
    assert client.post(f"/v1/events/{queued['id']}/redeliver").status_code == 202
    entries = redis_client.xrange(keys.outbox(partition), "-", "+")
    assert len(entries) == 2
    assert entries[-1][1]["only"] == "wh_abc"
    assert entries[-1][1]["id"] == queued["id"]
    meter.close()


def test_customer_shows_its_entitlement_history(admin: tuple[httpx.Client, str]) -> None:
    """GET /v1/customers/{id} lists the entitlements in force, oldest first, each with an RFC 3339
    `since`; writing the same entitlement again adds nothing."""
    from datetime import datetime

    client, _ = admin
    client.put("/v1/customers/hist", json={"entitlement": {"plan": "p"}})
    client.put("/v1/customers/hist/entitlement", json={"timezone": "Europe/Paris"})
    client.put("/v1/customers/hist/entitlement", json={"timezone": "Europe/Paris"})
    anchor = "2027-01-15T00:00:00+00:00"
    client.put("/v1/customers/hist/entitlement", json={"anchor": anchor})
    history = client.get("/v1/customers/hist").json()["history"]
    assert [(h["plan"], h["anchor"], h["timezone"]) for h in history] == [
        ("p", None, "UTC"),
        ("p", None, "Europe/Paris"),
        ("p", anchor, "Europe/Paris"),
    ]
    since = [datetime.fromisoformat(h["since"]) for h in history]
    assert all(h["since"].endswith("Z") for h in history)
    assert since == sorted(since)


def test_usage_refused_at_a_deny_tier_names_that_tier(admin: tuple[httpx.Client, str]) -> None:
    """POST usage past the Deny tier is 429 quota-exceeded with policy Deny and the tier's level."""
    client, _ = admin
    r = client.post("/v1/customers/c/usage", json={"metric": "calls", "value": 101})
    assert (r.status_code, problem_type(r)) == (429, "quota-exceeded")
    assert (r.json()["policy"], r.json()["level"], r.json()["metric"]) == (
        "Deny",
        "OverUsage",
        "calls",
    )
