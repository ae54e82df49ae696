"""The gateway's output read by parsers nobody here wrote: HTTP fields, Prometheus text."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from tests.adapters.harness import serve_asgi
from tests.gateway.test_proxy import KEY, UPSTREAM, gateway_config

from conftest import Clock, with_storage
from metergate import create_app

AUTH = {"Authorization": f"Bearer {KEY}"}


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
