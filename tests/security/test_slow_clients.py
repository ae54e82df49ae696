"""Slow clients: one customer's slow uploads cannot starve another; every wait has a deadline.

The numbers are scaled down from the attack that was seen (1,100 uploads against a pool of
1,000): here a pool of 8 upstream connections, a cap of 4 per customer, 12 slow uploads.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from tests.security.conftest import KEY, OTHER_KEY, Gateway, config, raw_exchange, serve, upstream

POOL = 8
PER_CUSTOMER = 4
ATTACK = 12
TIMEOUT_S = 3


@contextlib.contextmanager
def slow_uploads(gateway: Gateway, count: int, key: str = KEY) -> Iterator[list[socket.socket]]:
    """Open `count` uploads that declare 100,000 bytes and send one; wait until all are admitted."""
    head = (
        f"POST /v1/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Content-Length: 100000\r\n\r\nx"
    ).encode()
    customer = "acme" if key == KEY else "other"
    before = usage(gateway, customer)
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
            sock.sendall(head)
            socks.append(sock)
        deadline = time.monotonic() + 30
        while usage(gateway, customer) < before + count and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # admitted; now they take their upstream connections
        yield socks
    finally:
        for sock in socks:
            sock.close()


def usage(gateway: Gateway, customer: str) -> int:
    """The customer's `calls` this period, through the admin API."""
    r = gateway.admin_call("GET", f"/v1/customers/{customer}/usage")
    return int(r.json()["metrics"]["calls"]["value"])


def test_another_customer_is_served_while_one_runs_slow_uploads(tmp_path: Path) -> None:
    """With 12 slow uploads of one customer against a pool of 8, another customer's request is
    served (200, not a 504 after proxy.timeout_s)."""
    proxy = {
        "timeout_s": TIMEOUT_S,
        "max_connections": POOL,
        "max_connections_per_customer": PER_CUSTOMER,
    }
    with (
        upstream() as (url, _),
        serve(config(url, "memory://", proxy=proxy), tmp_path) as gw,
        slow_uploads(gw, ATTACK),
    ):
        r = gw.get("/v1/hello", key=OTHER_KEY)
        assert r.status_code == 200, r.text
        # the attacker's own next request waits for its own connections, then 504
        mine = gw.get("/v1/hello", key=KEY)
        assert mine.status_code == 504
        assert mine.json()["type"] == "urn:metergate:problem:gateway-timeout"


def test_waiting_for_a_pooled_connection_ends_in_504(tmp_path: Path) -> None:
    """When the whole pool is held, a request gets 504 after proxy.timeout_s instead of waiting
    for as long as the holders please."""
    proxy = {"timeout_s": 1, "max_connections": 2, "max_connections_per_customer": 10}
    with (
        upstream() as (url, _),
        serve(config(url, "memory://", proxy=proxy), tmp_path) as gw,
        slow_uploads(gw, 2),
    ):
        r = gw.get("/v1/hello", key=OTHER_KEY)
        assert r.status_code == 504
        assert r.json()["type"] == "urn:metergate:problem:gateway-timeout"


def test_a_stalled_request_body_is_408_and_closes(tmp_path: Path) -> None:
    """A body whose next chunk does not come within proxy.body_timeout_s is answered 408 and the
    connection is closed."""
    proxy = {"body_timeout_s": 1}
    with upstream() as (url, seen), serve(config(url, "memory://", proxy=proxy), tmp_path) as gw:
        data = (
            f"POST /v1/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Length: 10\r\n\r\nabc"
        ).encode()
        answer, closed = raw_exchange(gw.port, data, timeout_s=30)
        assert closed
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        assert json.loads(body)["type"] == "urn:metergate:problem:request-timeout"
        assert not seen.requests
        assert httpx.get(gw.proxy + "/unmetered", timeout=10).status_code == 200
