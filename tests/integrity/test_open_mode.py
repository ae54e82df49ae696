"""`on_failure: open` through `metergate serve`: what passed while Redis was paused is charged
once, by the gateway itself, with no later traffic."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from conftest import RedisProcess

from .conftest import Upstream, auth, books, gateway_config, paused, serve

pytestmark = pytest.mark.redis


def test_requests_let_through_are_charged_once_without_later_traffic(
    tmp_path: Path, upstream: tuple[str, Upstream], aof_redis: RedisProcess
) -> None:
    """Requests let through while Redis is paused are recorded once it answers again, each
    exactly once (a late admission and its deferred record are one charge), with no new request
    to trigger it."""
    url, _ = upstream
    config = gateway_config(url, aof_redis.url, {"c": 1000}, timeout_ms=100, on_failure="open")
    with serve(tmp_path, config) as gw, httpx.Client(headers=auth(), timeout=10) as client:
        served = 0
        while client.get(f"{gw.proxy}/v1/a").status_code != 200:
            time.sleep(0.1)
        served += 1
        degraded = 0
        with paused(aof_redis):
            for _ in range(10):
                response = client.get(f"{gw.proxy}/v1/a")
                assert response.status_code == 200
                served += 1
                degraded += response.headers.get("metergate-degraded") == "?1"
        assert degraded > 0
        expected = (served, 1000 - served, 0, 1000 - served)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if books(gw, "c") == expected:
                    break
            except (httpx.HTTPError, AssertionError):
                pass
            time.sleep(0.2)
        assert books(gw, "c") == expected
        time.sleep(1)  # nothing arrives later to charge twice
        assert books(gw, "c") == expected
