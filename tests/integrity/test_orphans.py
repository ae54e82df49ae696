"""Admin reservations without a key during a Redis pause: a 503 never leaves a hold behind."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import RedisProcess

from .conftest import Upstream, admin, gateway_config, paused, serve

pytestmark = pytest.mark.redis


def test_reservations_answered_503_hold_nothing(
    tmp_path: Path, upstream: tuple[str, Upstream], aof_redis: RedisProcess
) -> None:
    """Only the reservations answered 201 hold credit once Redis is back: those answered 503
    (made late, or never) are cancelled by the gateway itself."""
    url, _ = upstream
    config = gateway_config(url, aof_redis.url, {"c": 100_000}, timeout_ms=100)
    with serve(tmp_path, config) as gw:
        created: list[str] = []
        answers: list[int] = []
        stop = threading.Event()

        def reserve() -> None:
            while not stop.is_set():
                try:
                    r = admin(
                        gw,
                        "POST",
                        "/v1/customers/c/balances/credits/reservations",
                        json={"amount": 2, "ttl_s": 600},
                    )
                except httpx.HTTPError:
                    continue
                answers.append(r.status_code)
                if r.status_code == 201:
                    created.append(r.json()["id"])

        workers = [threading.Thread(target=reserve) for _ in range(4)]
        for w in workers:
            w.start()
        time.sleep(1)
        with paused(aof_redis):
            time.sleep(1.5)
        time.sleep(1)
        stop.set()
        for w in workers:
            w.join()
        assert 503 in answers
        expected = 2 * len(created)
        deadline = time.monotonic() + 30
        held = -1
        while time.monotonic() < deadline:
            try:
                held = admin(gw, "GET", "/v1/customers/c/balances/credits").json()["held"]
            except (httpx.HTTPError, KeyError):
                held = -1
            if held == expected:
                break
            time.sleep(0.2)
        assert held == expected, (held, expected, answers.count(503))
