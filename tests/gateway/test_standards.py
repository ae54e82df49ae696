"""The gateway's output read by parsers nobody here wrote: HTTP fields, Prometheus text."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.adapters.harness import serve_asgi
from tests.gateway.test_proxy import KEY, UPSTREAM, gateway_config
from tests.worker.conftest import run

from conftest import Clock, with_storage
from metergate import admin_app, create_app, parse_config
from metergate.storage import AsyncStorage
from metergate.worker import Worker

AUTH = {"Authorization": f"Bearer {KEY}"}
TOKEN = "standards-admin-token-0123"


@pytest.fixture
def proxy(storage_url: str, clock: Clock) -> Iterator[str]:
    """The metered proxy served by uvicorn in front of an upstream also served by uvicorn."""
    with serve_asgi(UPSTREAM) as upstream:
        config = with_storage(gateway_config(upstream), storage_url)
        with serve_asgi(create_app(config, clock=clock)) as url:
            yield url


def test_a_proxied_response_carries_one_date(proxy: str) -> None:
    """Both servers add a Date; the proxied response carries exactly one (RFC 9110 6.6.1)."""
    upstream_says = httpx.get(f"{proxy}/v1/x", headers=AUTH)
    assert upstream_says.status_code == 200
    assert len(upstream_says.headers.get_list("date")) == 1
    refused = httpx.get(f"{proxy}/v1/x")
    assert refused.status_code == 401
    assert len(refused.headers.get_list("date")) == 1


def _samples(text: str) -> dict[str, float]:
    """Parse Prometheus text exposition with prometheus_client's own parser."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def test_metrics_parse_and_count_the_webhook_backlog(storage_url: str, clock: Clock) -> None:
    """/metrics parses as Prometheus text; the backlog counts three pending events, then none."""
    config = with_storage(gateway_config("http://127.0.0.1:9"), storage_url)
    config["admin"] = {"token": TOKEN}
    with (
        serve_asgi(admin_app(config)) as admin_url,
        httpx.Client(base_url=admin_url, headers={"Authorization": f"Bearer {TOKEN}"}) as client,
    ):
        assert httpx.get(f"{admin_url}/metrics").status_code == 401
        before = _samples(client.get("/metrics").text)["metergate_webhook_backlog"]
        for _ in range(3):
            assert client.post(
                "/v1/customers/c/balances/credits/topup", json={"amount": 1}
            ).is_success
        after = client.get("/metrics")
        assert after.headers["content-type"].startswith("text/plain; version=")
        samples = _samples(after.text)
        assert samples["metergate_webhook_backlog"] == before + 3
        assert "metergate_decision_seconds_count" in samples

        async def deliver(storage: AsyncStorage) -> None:
            async with httpx.AsyncClient() as http:
                await Worker(parse_config(config), storage, clock, http).run_once()

        run(deliver, storage_url)
        assert _samples(client.get("/metrics").text)["metergate_webhook_backlog"] == 0


def _sf_items(field: str) -> dict[str, dict[str, object]]:
    import http_sfv

    parsed = http_sfv.List()
    parsed.parse(field.encode())
    assert all(isinstance(item.value, str) for item in parsed)  # items name policies
    return {str(item.value): dict(item.params) for item in parsed}


def test_ratelimit_fields_parse_as_rfc_9651_lists(proxy: str) -> None:
    """RateLimit-Policy and RateLimit parse with http-sfv (RFC 9651) and carry only the draft's
    parameters: a period quota has q and w, r and t; the concurrency item says qu
    concurrent-requests and has no window."""
    periodic = httpx.get(f"{proxy}/v1/x", headers=AUTH)
    policy = _sf_items(periodic.headers["ratelimit-policy"])
    assert set(policy) == {"calls"} and set(policy["calls"]) == {"q", "w"}
    assert policy["calls"]["q"] == 100
    assert set(_sf_items(periodic.headers["ratelimit"])["calls"]) == {"r", "t"}
    concurrent = httpx.get(f"{proxy}/stream", headers=AUTH)
    assert _sf_items(concurrent.headers["ratelimit-policy"]) == {
        "in_flight": {"q": 5, "qu": "concurrent-requests"}
    }
    assert set(_sf_items(concurrent.headers["ratelimit"])["in_flight"]) == {"r"}
