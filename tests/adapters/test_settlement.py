"""Response-priced costs and UpDownCounter leases settle exactly once, however the response ends."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from .conftest import Gateway
from .harness import ACME, eventually

STREAM = {**ACME, "x-mode": "stream"}


def settled(gateway: Gateway, customer: str = "acme") -> tuple[int, int, int, int]:
    """Return (tokens value, tokens pending, in_flight value, credits held)."""
    tokens = gateway.meter.usage(customer, "tokens")
    in_flight = gateway.meter.usage(customer, "in_flight")
    held = gateway.meter.balance(customer, "credits").held
    return int(tokens["value"]), int(tokens["pending"]), int(in_flight["value"]), held


def test_response_header_prices_a_plain_response(gateway: Gateway) -> None:
    """The reserve is held during the request; the response header's units are what is charged."""
    response = gateway.client.post("/v1/chat", headers={**ACME, "x-tokens": "7"})
    assert response.status_code == 200 and response.text.startswith("{")
    assert response.headers["metergate-balance"] == "950"  # 1000 less the 50 held
    assert settled(gateway) == (7, 0, 0, 0)
    assert gateway.meter.balance("acme", "credits").available == 993


def test_response_header_prices_a_streamed_response(gateway: Gateway) -> None:
    """A streamed response is settled from its header once its last chunk is sent."""
    with gateway.client.stream(
        "POST",
        "/v1/chat",
        headers={**STREAM, "x-tokens": "12", "x-chunks": "4", "x-delay-ms": "50"},
    ) as response:
        assert response.status_code == 200
        assert settled(gateway) == (0, 50, 1, 50)  # in flight: held and leased
        chunks = list(response.iter_bytes())
    assert b"".join(chunks) == b"chunk 0\nchunk 1\nchunk 2\nchunk 3\n"
    assert settled(gateway) == (12, 0, 0, 0)
    assert gateway.meter.balance("acme", "credits").available == 988


@pytest.mark.parametrize("header", [None, "1.5"])
def test_missing_or_unreadable_header_charges_the_reserve(
    gateway: Gateway, header: str | None
) -> None:
    """Without a readable response header the reserve (50) is what is recorded and charged."""
    headers = dict(ACME) if header is None else {**ACME, "x-tokens": header}
    assert gateway.client.post("/v1/chat", headers=headers).status_code == 200
    assert settled(gateway) == (50, 0, 0, 0)
    assert gateway.meter.balance("acme", "credits").available == 950


def test_client_disconnect_mid_stream_settles_the_hold(gateway: Gateway) -> None:
    """A client that hangs up mid-stream still gets its hold settled and its lease ended."""
    headers = {**STREAM, "x-tokens": "9", "x-chunks": "500", "x-delay-ms": "10"}
    with gateway.client.stream("POST", "/v1/chat", headers=headers) as response:
        chunks = response.iter_bytes()  # an unreferenced iterator would close the response
        assert next(chunks).startswith(b"chunk 0")
        assert settled(gateway) == (0, 50, 1, 50)
    assert eventually(lambda: _assert_settled(gateway, (9, 0, 0, 0)))
    assert gateway.meter.balance("acme", "credits").available == 991


def _assert_settled(gateway: Gateway, expected: tuple[int, int, int, int]) -> bool:
    assert settled(gateway) == expected
    return True


def test_lease_ends_after_a_normal_response(gateway: Gateway) -> None:
    """An UpDownCounter is back at zero as soon as the response has been received."""
    for _ in range(3):
        response = gateway.client.get("/v1/concurrent", headers=ACME)
        assert response.status_code == 200
        assert gateway.meter.usage("acme", "in_flight")["value"] == 0


def test_lease_ends_when_the_app_raises(gateway: Gateway) -> None:
    """An app that raises before answering (a 500) ends its lease and releases its hold unpaid."""
    response = gateway.client.post("/v1/chat", headers={**ACME, "x-mode": "raise"})
    assert response.status_code == 500
    assert settled(gateway) == (0, 0, 0, 0)
    assert gateway.meter.balance("acme", "credits").available == 1000
    assert (
        gateway.client.get("/v1/concurrent", headers={**ACME, "x-mode": "raise"}).status_code == 500
    )
    assert gateway.meter.usage("acme", "in_flight")["value"] == 0


def test_lease_ends_when_the_app_raises_mid_body(gateway: Gateway) -> None:
    """An app that raises after its first chunk still ends its lease; the header's units count."""
    # uvicorn breaks the chunked body off; wsgiref, which sends no length, just closes early.
    with contextlib.suppress(httpx.RemoteProtocolError):
        response = gateway.client.post(
            "/v1/chat", headers={**ACME, "x-mode": "raise-mid", "x-tokens": "4"}
        )
        assert response.content == b"chunk 0\n"
    assert eventually(lambda: _assert_settled(gateway, (4, 0, 0, 0)))


def test_lease_ends_when_the_client_disconnects(gateway: Gateway) -> None:
    """A client that hangs up mid-stream gives its UpDownCounter unit back."""
    headers = {**STREAM, "x-chunks": "500", "x-delay-ms": "10"}
    with gateway.client.stream("GET", "/v1/concurrent", headers=headers) as response:
        chunks = response.iter_bytes()
        next(chunks)
        assert gateway.meter.usage("acme", "in_flight")["value"] == 1
    eventually(lambda: _assert_in_flight(gateway, 0))
    assert gateway.client.get("/v1/concurrent", headers=ACME).status_code == 200


def _assert_in_flight(gateway: Gateway, value: int) -> None:
    assert gateway.meter.usage("acme", "in_flight")["value"] == value


def test_idempotency_key_meters_retries_once(gateway: Gateway) -> None:
    """Retries with the same Idempotency-Key get the stored response, replayed without reaching the
    app, and are charged once."""
    headers = {**ACME, "idempotency-key": "order-42"}
    balances = [gateway.client.get("/v1/anything", headers=headers) for _ in range(3)]
    assert [r.status_code for r in balances] == [200, 200, 200]
    assert [r.headers.get("idempotent-replayed") for r in balances] == [None, "true", "true"]
    assert balances[2].content == balances[0].content
    assert gateway.seen.paths() == ["/v1/anything"]
    assert gateway.meter.usage("acme", "calls")["value"] == 1
    assert gateway.meter.balance("acme", "credits").available == 999
    other = gateway.client.get("/v1/anything", headers={**ACME, "idempotency-key": "order-43"})
    assert other.headers["metergate-balance"] == "998"


def test_idempotency_key_keeps_the_first_settlement(gateway: Gateway) -> None:
    """A retried response-priced request is replayed: the first settlement's units stand."""
    headers = {**ACME, "idempotency-key": "chat-1", "x-tokens": "7"}
    assert gateway.client.post("/v1/chat", headers=headers).is_success
    assert gateway.client.post("/v1/chat", headers=headers).headers["idempotent-replayed"] == "true"
    assert settled(gateway) == (7, 0, 0, 0)
    assert gateway.meter.balance("acme", "credits").available == 993


def test_idempotency_key_is_scoped_to_the_customer(gateway: Gateway) -> None:
    """Two customers using the same Idempotency-Key are each metered."""
    gateway.meter.topup("broke", "credits", 10)
    for key in ("acme-key", "broke-key"):
        headers = {"authorization": f"Bearer {key}", "idempotency-key": "same"}
        assert gateway.client.get("/v1/anything", headers=headers).status_code == 200
    assert gateway.meter.usage("acme", "calls")["value"] == 1
    assert gateway.meter.usage("broke", "calls")["value"] == 1


def test_idempotency_key_after_a_refunded_answer_is_charged_once(gateway: Gateway) -> None:
    """A keyed request answered 500 is refunded and its key given up: the retry is forwarded and
    charged once, and a further retry replays it free."""
    headers = {**ACME, "idempotency-key": "after-500"}
    failed = gateway.client.get("/v1/anything", headers={**headers, "x-mode": "raise"})
    assert failed.status_code == 500
    assert gateway.meter.usage("acme", "calls")["value"] == 0
    retried = gateway.client.get("/v1/anything", headers=headers)
    again = gateway.client.get("/v1/anything", headers=headers)
    assert (retried.status_code, again.status_code) == (200, 200)
    assert "idempotent-replayed" not in retried.headers
    assert again.headers.get("idempotent-replayed") == "true"
    assert gateway.seen.paths() == ["/v1/anything", "/v1/anything"]
    assert gateway.meter.usage("acme", "calls")["value"] == 1
    assert gateway.meter.balance("acme", "credits").available == 999
