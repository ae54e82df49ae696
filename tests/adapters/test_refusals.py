"""Every refusal of both middlewares: exact problem+json, status and headers; no app involved."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from conftest import Clock, free_port, with_storage

from .conftest import Gateway
from .harness import ACME, CONFIG, DAY_END, MONTH_END, assert_problem, sf_items


def test_no_key_is_401(gateway: Gateway) -> None:
    """A metered request without a key is refused 401 unauthenticated with a Bearer challenge."""
    response = gateway.client.get("/v1/anything")
    assert_problem(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "ratelimit" not in response.headers
    assert gateway.seen.paths() == []


def test_unknown_key_is_401(gateway: Gateway) -> None:
    """A key nobody holds is refused 401 unauthenticated and never reaches the app."""
    response = gateway.client.get("/v1/anything", headers={"authorization": "Bearer nobody"})
    assert_problem(response, 401, "unauthenticated")
    assert gateway.seen.paths() == []


def test_insufficient_credits_is_402(gateway: Gateway) -> None:
    """A priced request the balance cannot cover is refused 402 with the balance left."""
    response = gateway.client.get("/v1/anything", headers={"authorization": "Bearer broke-key"})
    assert_problem(response, 402, "insufficient-credits", customer="broke", level="Normal")
    assert response.headers["metergate-level"] == "Normal"
    assert gateway.seen.paths() == []
    assert gateway.meter.usage("broke", "calls")["value"] == 0


def test_insufficient_credits_for_a_reserve_is_402(gateway: Gateway) -> None:
    """A response-priced request whose reserve the balance cannot hold is refused 402."""
    response = gateway.client.post("/v1/chat", headers={"authorization": "Bearer broke-key"})
    assert_problem(response, 402, "insufficient-credits", customer="broke")
    assert gateway.meter.usage("broke", "tokens")["pending"] == 0
    assert gateway.meter.usage("broke", "in_flight")["value"] == 0


def test_suspended_asset_is_403(gateway: Gateway) -> None:
    """A request on a suspended asset is refused 403 asset-suspended naming the metric."""
    gateway.meter.suspend_asset("acme", "capped")
    response = gateway.client.get("/v1/capped", headers=ACME)
    assert_problem(response, 403, "asset-suspended", customer="acme", metric="capped")
    assert gateway.seen.paths() == []


def test_suspended_balance_is_403(gateway: Gateway) -> None:
    """A request charging a suspended balance is refused 403 balance-suspended."""
    gateway.meter.suspend_balance("acme", "credits")
    response = gateway.client.get("/v1/anything", headers=ACME)
    assert_problem(response, 403, "balance-suspended", customer="acme")
    assert gateway.seen.paths() == []
    assert gateway.meter.balance("acme", "credits").available == 1000


def test_not_entitled_is_403(gateway: Gateway) -> None:
    """A metric the customer's plan does not configure is refused 403 not-entitled."""
    response = gateway.client.get("/v1/capped", headers={"authorization": "Bearer free-key"})
    assert_problem(response, 403, "not-entitled", customer="freebie", metric="capped")
    assert gateway.seen.paths() == []


def test_quota_exceeded_is_429_until_the_period_ends(gateway: Gateway, clock: Clock) -> None:
    """Past a Deny tier the request is refused 429 with Retry-After = seconds to the period end,
    naming the tier that refused (OverUsage, Deny), not the tier the value is in (Warning)."""
    for _ in range(10):
        assert gateway.client.get("/v1/capped", headers=ACME).status_code == 200
    clock.advance(0.4)
    response = gateway.client.get("/v1/capped", headers=ACME)
    wait = MONTH_END - 1_800_000_000
    body = assert_problem(
        response,
        429,
        "quota-exceeded",
        customer="acme",
        metric="capped",
        level="OverUsage",
        policy="Deny",
        retry_after=wait,
    )
    assert body["retry_after"] == int(response.headers["retry-after"]) == wait
    assert sf_items(response.headers["ratelimit"])["capped"] == {"r": 0, "t": wait}
    assert len(gateway.seen.paths()) == 10
    assert gateway.meter.usage("acme", "capped")["value"] == 10
    assert response.headers["metergate-level"] == "Warning"  # the value's level is unchanged


def test_rate_limited_is_429_with_the_exact_wait(gateway: Gateway, clock: Clock) -> None:
    """In a RateLimit tier (2 per minute) the third request waits exactly 30 s, then passes."""
    for _ in range(2):
        assert gateway.client.get("/v1/burst", headers=ACME).status_code == 200
    response = gateway.client.get("/v1/burst", headers=ACME)
    assert_problem(
        response, 429, "rate-limited", metric="burst", level="Critical", policy="RateLimit"
    )
    assert response.headers["retry-after"] == "30"
    assert sf_items(response.headers["ratelimit-policy"]) == {"burst-throttle": {"q": 2, "w": 60}}
    assert sf_items(response.headers["ratelimit"]) == {"burst-throttle": {"r": 0}}
    clock.advance(29)
    retry = gateway.client.get("/v1/burst", headers=ACME)
    assert retry.status_code == 429 and retry.headers["retry-after"] == "1"
    clock.advance(1)
    assert gateway.client.get("/v1/burst", headers=ACME).status_code == 200
    assert gateway.meter.usage("acme", "burst")["period_end"] == DAY_END


def test_concurrency_limit_is_429_with_retry_after_1(gateway: Gateway) -> None:
    """An UpDownCounter Deny refusal says Retry-After: 1, since units free up as responses end."""
    with (
        gateway.client.stream(
            "POST",
            "/v1/chat",
            headers={**ACME, "x-mode": "stream", "x-chunks": "50", "x-delay-ms": "20"},
        ) as first,
        gateway.client.stream(
            "POST",
            "/v1/chat",
            headers={**ACME, "x-mode": "stream", "x-chunks": "50", "x-delay-ms": "20"},
        ) as second,
    ):
        assert first.status_code == second.status_code == 200
        response = gateway.client.get("/v1/concurrent", headers=ACME)
        assert_problem(
            response,
            429,
            "quota-exceeded",
            metric="in_flight",
            level="OverUsage",
            policy="Deny",
            retry_after=1,
        )
        assert response.headers["retry-after"] == "1"
        # RFC 9651 parse: the concurrency item counts requests in flight, it has no window
        policy = sf_items(response.headers["ratelimit-policy"])["in_flight"]
        assert policy == {"q": 2, "qu": "concurrent-requests"}


def test_unmatched_deny_is_404(
    start_gateway: Callable[..., Gateway], gateway_config: dict[str, Any]
) -> None:
    """With `unmatched: deny` a request no route matches is refused 404 not-metered."""
    gateway = start_gateway({**gateway_config, "unmatched": "deny"})
    response = gateway.client.get("/elsewhere", headers=ACME)
    assert_problem(response, 404, "not-metered")
    assert gateway.seen.paths() == []


def test_idempotency_conflict_is_409(gateway: Gateway) -> None:
    """The same Idempotency-Key with a different cost is refused 409 idempotency-conflict."""
    headers = {**ACME, "idempotency-key": "k-1"}
    assert gateway.client.get("/v1/weighted", headers={**headers, "x-weight": "2"}).is_success
    response = gateway.client.get("/v1/weighted", headers={**headers, "x-weight": "3"})
    assert_problem(response, 409, "idempotency-conflict")
    assert gateway.meter.usage("acme", "calls")["value"] == 2


def test_unreadable_cost_header_is_400(gateway: Gateway) -> None:
    """A request-header cost that is not a non-negative integer is refused 400 naming the header."""
    response = gateway.client.get("/v1/weighted", headers={**ACME, "x-weight": "2.5"})
    body = assert_problem(response, 400, "invalid-request")
    assert body["errors"] == [{"field": "X-Weight", "message": "must be a non-negative integer"}]
    assert gateway.seen.paths() == []


def unreachable(on_failure: str) -> dict[str, Any]:
    """The test config with storage on a loopback port nobody listens on."""
    config = with_storage(copy.deepcopy(CONFIG), f"redis://127.0.0.1:{free_port()}/0")
    config["storage"]["on_failure"] = on_failure
    return config


def test_storage_down_closed_is_503(start_gateway: Callable[..., Gateway]) -> None:
    """With storage down and `on_failure: closed` requests are refused 503 with Retry-After."""
    gateway = start_gateway(unreachable("closed"))
    response = gateway.client.get("/v1/anything", headers=ACME)
    assert_problem(response, 503, "metering-unavailable", retry_after=1)
    assert response.headers["retry-after"] == "1"
    assert gateway.seen.paths() == []


def test_storage_down_open_lets_requests_through_degraded(
    start_gateway: Callable[..., Gateway],
) -> None:
    """With storage down and `on_failure: open` requests pass, marked `metergate-degraded: ?1`."""
    gateway = start_gateway(unreachable("open"))
    for path in ("/v1/anything", "/v1/anything", "/v1/capped"):
        response = gateway.client.get(path, headers=ACME)
        assert response.status_code == 200
        assert response.headers["metergate-degraded"] == "?1"
        assert "ratelimit" not in response.headers
    chat = gateway.client.post("/v1/chat", headers={**ACME, "x-tokens": "7"})
    assert chat.status_code == 200 and chat.headers["metergate-degraded"] == "?1"
    assert gateway.seen.paths() == ["/v1/anything", "/v1/anything", "/v1/capped", "/v1/chat"]


def test_identity_header_is_configurable(
    start_gateway: Callable[..., Gateway], gateway_config: dict[str, Any]
) -> None:
    """With `identity.header: X-API-Key` the key is read there and the 401 challenge names it."""
    gateway = start_gateway({**gateway_config, "identity": {"header": "X-API-Key"}})
    assert gateway.client.get("/v1/anything", headers={"x-api-key": "acme-key"}).is_success
    refused = gateway.client.get("/v1/anything", headers=ACME)
    assert_problem(refused, 401, "unauthenticated")
    assert refused.headers["www-authenticate"] == 'ApiKey realm="metergate", header="X-API-Key"'
