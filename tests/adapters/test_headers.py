"""What both middlewares add to allowed responses, and everything they leave alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .conftest import Gateway
from .harness import ACME, DAY_END, MONTH_END, MONTH_START, TEAPOT_BODY, TEAPOT_HEADERS, sf_items

NOW = 1_800_000_000


def test_ratelimit_fields_count_down_the_quota(gateway: Gateway) -> None:
    """RateLimit-Policy and RateLimit parse as SF Lists with q, w, r and t of the asset's period."""
    for remaining in (9, 8):
        response = gateway.client.get("/v1/capped", headers=ACME)
        assert response.status_code == 200
        policy = sf_items(response.headers["ratelimit-policy"])
        assert policy == {"capped": {"q": 10, "w": MONTH_END - MONTH_START}}
        state = sf_items(response.headers["ratelimit"])
        assert state == {"capped": {"r": remaining, "t": MONTH_END - NOW}}


def test_ratelimit_fields_of_a_throttle(gateway: Gateway) -> None:
    """An asset in a RateLimit tier gets a `-throttle` item with q = rate.limit and w = rate.per."""
    first = gateway.client.get("/v1/burst", headers=ACME)
    assert sf_items(first.headers["ratelimit-policy"]) == {"burst-throttle": {"q": 2, "w": 60}}
    assert sf_items(first.headers["ratelimit"]) == {"burst-throttle": {"r": 1}}
    assert first.headers["metergate-level"] == "Critical"
    assert gateway.meter.usage("acme", "burst")["period_end"] == DAY_END


def test_metergate_level_follows_the_tiers(gateway: Gateway) -> None:
    """Metergate-Level is Normal up to a tier's `from` and Warning from the next unit on."""
    levels = [gateway.client.get("/v1/capped", headers=ACME).headers["metergate-level"]]
    levels += [gateway.client.get("/v1/capped", headers=ACME).headers["metergate-level"]]
    for _ in range(6):
        gateway.client.get("/v1/capped", headers=ACME)
    levels += [gateway.client.get("/v1/capped", headers=ACME).headers["metergate-level"]]
    assert levels == ["Normal", "Normal", "Warning"]


def test_metergate_balance_is_what_is_left(gateway: Gateway) -> None:
    """Metergate-Balance is the balance's available credits after each charged request."""
    balances = [
        gateway.client.get("/v1/anything", headers=ACME).headers["metergate-balance"]
        for _ in range(3)
    ]
    assert balances == ["999", "998", "997"]
    weighted = gateway.client.get("/v1/weighted", headers={**ACME, "x-weight": "7"})
    shown = int(weighted.headers["metergate-balance"])
    if gateway.middleware.meter.book is None:
        assert shown == 990
    else:
        # Another route's allowance still holds its unused credits: the field stays
        # conservative, never more than storage would grant (SPEC section 2).
        assert 990 - 1000 < shown <= 990
    assert gateway.meter.balance("acme", "credits").available == 990


def test_unpriced_request_has_no_balance_field(gateway: Gateway) -> None:
    """A request that charges no balance carries no Metergate-Balance."""
    response = gateway.client.get("/v1/capped", headers=ACME)
    assert response.status_code == 200 and "metergate-balance" not in response.headers


def test_app_status_headers_and_body_are_untouched(gateway: Gateway) -> None:
    """The app's own status, headers (repeated ones too) and bytes reach the client as they were."""
    response = gateway.client.get("/v1/anything", headers={**ACME, "x-mode": "teapot"})
    assert response.status_code == 418
    assert response.content == TEAPOT_BODY
    ours = {"ratelimit-policy", "ratelimit", "metergate-level", "metergate-balance"}
    app_headers = [
        (k, v)
        for k, v in response.headers.multi_items()
        if k not in ours and k not in ("date", "server", "content-length", "transfer-encoding")
    ]
    assert app_headers == TEAPOT_HEADERS
    assert response.headers["metergate-balance"] == "999"


def test_request_reaches_the_app_unchanged(gateway: Gateway) -> None:
    """An admitted request reaches the app with its method and path; the app's body comes back."""
    response = gateway.client.post("/v1/some/deep/path", headers=ACME)
    assert response.json() == {"path": "/v1/some/deep/path", "method": "POST"}
    assert response.headers["x-app"] == "test"
    assert gateway.seen.requests == [("POST", "/v1/some/deep/path")]


def test_unmetered_route_needs_no_key(gateway: Gateway) -> None:
    """A `meter: []` route passes without a key and without any metering field."""
    response = gateway.client.get("/healthz")
    assert response.status_code == 200
    assert not {k for k in response.headers if k.startswith(("ratelimit", "metergate"))}
    assert gateway.seen.paths() == ["/healthz"]


def test_unmatched_pass_is_not_metered(gateway: Gateway) -> None:
    """With `unmatched: pass` a request no route matches reaches the app unmetered, keyless."""
    response = gateway.client.get("/elsewhere")
    assert response.status_code == 200
    assert "metergate-level" not in response.headers
    assert gateway.seen.paths() == ["/elsewhere"]


def test_method_outside_the_route_is_unmatched(
    start_gateway: Callable[..., Gateway], gateway_config: dict[str, Any]
) -> None:
    """A method the route does not list does not match it (here: denied as not metered)."""
    gateway = start_gateway({**gateway_config, "unmatched": "deny"})
    assert gateway.client.delete("/v1/anything", headers=ACME).status_code == 404
    assert gateway.client.get("/v1/anything", headers=ACME).status_code == 200


def test_head_is_metered_like_get(gateway: Gateway) -> None:
    """HEAD on a GET route is metered (frameworks answer HEAD with the GET handler)."""
    assert gateway.client.head("/v1/anything").status_code == 401
    response = gateway.client.head("/v1/anything", headers=ACME)
    assert response.status_code == 200 and response.headers["metergate-balance"] == "999"
    assert gateway.meter.usage("acme", "calls")["value"] == 1
