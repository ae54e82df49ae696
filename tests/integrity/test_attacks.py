"""The attacks on billing integrity, through `metergate serve` on a real Redis: each must fail."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import httpx
import pytest

from conftest import RedisProcess, free_port

from .conftest import ALLOWANCES, Upstream, admin, auth, books, gateway_config, serve

pytestmark = pytest.mark.redis


def raw(url: str, data: bytes) -> bytes:
    """Send raw bytes to a server and return what it answers before closing or going quiet."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=3) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    return answer


def test_gateway_answers_after_admitting_are_not_charged(
    tmp_path: Path, upstream: tuple[str, Upstream], redis_server: RedisProcess
) -> None:
    """413 (declared and chunked), 400 (CL+TE), 504 (slow upstream) and 502 (upstream down) cost
    nothing: the admission is refunded."""
    redis_server.client().flushall()
    url, _ = upstream
    with serve(tmp_path, gateway_config(url, redis_server.url, {"c": 100})) as gw:
        with httpx.Client(base_url=gw.proxy, headers=auth(), timeout=10) as client:
            assert client.post("/v1/x", content=b"a" * 2000).status_code == 413
            chunks = iter([b"a" * 600, b"a" * 600])
            assert client.post("/v1/x", content=chunks).status_code == 413
            assert client.get("/v1/slow", headers={"x-sleep": "3"}).status_code == 504
        answer = raw(
            gw.proxy,
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-of-c\r\n"
            b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 400")
        assert books(gw, "c") == (0, 100, 0, 100)
    dead = f"http://127.0.0.1:{free_port()}"
    with serve(tmp_path, gateway_config(dead, redis_server.url, {"c": 100})) as gw:
        assert httpx.get(f"{gw.proxy}/v1/x", headers=auth(), timeout=10).status_code == 502
        assert books(gw, "c") == (0, 100, 0, 100)


def test_refund_on_follows_the_route(
    tmp_path: Path, upstream: tuple[str, Upstream], redis_server: RedisProcess
) -> None:
    """An upstream 500 is refunded by default, a 404 on a `4xx` route too, a 500 on `[]` is not."""
    redis_server.client().flushall()
    url, _ = upstream
    with serve(tmp_path, gateway_config(url, redis_server.url, {"c": 100})) as gw:
        with httpx.Client(base_url=gw.proxy, headers=auth(), timeout=10) as client:
            assert client.get("/v1/fail").status_code == 500
            assert client.get("/v1/missing/1").status_code == 404
            assert client.get("/v1/ok").status_code == 200
            assert books(gw, "c") == (1, 99, 0, 99)
            assert client.get("/v1/free-fail").status_code == 500
            assert books(gw, "c") == (2, 98, 0, 98)
        kinds = [e["kind"] for e in admin(gw, "GET", "/v1/customers/c/ledger").json()["entries"]]
        # From an allowance a refunded request is never charged at all: nothing to pay back.
        assert kinds.count("refund") == 2 or (ALLOWANCES and kinds.count("refund") < 2)


def test_one_idempotency_key_does_not_buy_other_requests(
    tmp_path: Path, upstream: tuple[str, Upstream], redis_server: RedisProcess
) -> None:
    """A key reused on other paths or bodies is 409 and never forwarded; its own retry is the stored
    response, replayed without a charge, even after the balance is suspended or spent."""
    redis_server.client().flushall()
    url, app = upstream
    config = gateway_config(url, redis_server.url, {"c": 2})
    with (
        serve(tmp_path, config) as gw,
        httpx.Client(base_url=gw.proxy, headers=auth(), timeout=10) as client,
    ):
        first = client.post("/v1/a", content=b"one", headers={"idempotency-key": "forever"})
        assert first.status_code == 200
        for i in range(10):
            other = client.post(
                f"/v1/e/{i}", content=f"b{i}".encode(), headers={"idempotency-key": "forever"}
            )
            assert other.status_code == 409
            assert other.json()["type"].endswith("idempotency-conflict")
        same_path = client.post("/v1/a", content=b"two", headers={"idempotency-key": "forever"})
        assert same_path.status_code == 409
        assert client.get("/v1/a?x=1", headers={"idempotency-key": "forever"}).status_code == 409
        assert app.hits == ["/v1/a"]
        assert client.get("/v1/b").status_code == 200
        assert client.get("/v1/b").status_code == 402
        admin(gw, "POST", "/v1/customers/c/balances/credits/suspend")
        again = client.post("/v1/a", content=b"one", headers={"idempotency-key": "forever"})
        assert again.status_code == 200
        assert again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content
        assert app.hits == ["/v1/a", "/v1/b"]
        assert books(gw, "c") == (2, 0, 0, 0)


def test_a_duplicate_in_flight_is_409_with_retry_after(
    tmp_path: Path, upstream: tuple[str, Upstream], redis_server: RedisProcess
) -> None:
    """While a keyed request is in flight, its duplicate is 409 idempotency-in-flight, Retry-After 1,
    and is neither forwarded nor charged."""
    redis_server.client().flushall()
    url, app = upstream
    with serve(tmp_path, gateway_config(url, redis_server.url, {"c": 100})) as gw:
        headers = {**auth(), "idempotency-key": "slow-1", "x-sleep": "0.5"}
        results: list[httpx.Response] = []
        first = threading.Thread(
            target=lambda: results.append(httpx.get(f"{gw.proxy}/v1/slow", headers=headers))
        )
        first.start()
        while not app.hits:
            threading.Event().wait(0.01)
        duplicate = httpx.get(f"{gw.proxy}/v1/slow", headers=headers, timeout=10)
        first.join()
        assert duplicate.status_code == 409
        assert duplicate.headers["retry-after"] == "1"
        assert duplicate.json()["type"].endswith("idempotency-in-flight")
        assert results[0].status_code == 200
        assert app.hits == ["/v1/slow"]
        assert books(gw, "c") == (1, 99, 0, 99)


def test_a_refunded_keyed_request_is_new_when_retried(
    tmp_path: Path, upstream: tuple[str, Upstream], redis_server: RedisProcess
) -> None:
    """A keyed request whose 500 was refunded is forwarded and metered again when retried."""
    redis_server.client().flushall()
    url, app = upstream
    with serve(tmp_path, gateway_config(url, redis_server.url, {"c": 100})) as gw:
        headers = {**auth(), "idempotency-key": "k-500"}
        for _ in range(2):
            assert httpx.get(f"{gw.proxy}/v1/fail", headers=headers, timeout=10).status_code == 500
        assert app.hits == ["/v1/fail", "/v1/fail"]
        assert books(gw, "c") == (0, 100, 0, 100)


def test_customer_and_operator_keys_never_collide(
    tmp_path: Path, upstream: tuple[str, Upstream], redis_server: RedisProcess
) -> None:
    """A customer's Idempotency-Key on the proxy and an operator's top-up key of the same text are
    two different operations, in either order."""
    redis_server.client().flushall()
    url, _ = upstream
    with serve(tmp_path, gateway_config(url, redis_server.url, {"c": 100})) as gw:
        key = {"idempotency-key": "invoice-2026-12"}
        assert httpx.get(f"{gw.proxy}/v1/a", headers={**auth(), **key}).status_code == 200
        topup = admin(
            gw, "POST", "/v1/customers/c/balances/credits/topup", json={"amount": 50}, headers=key
        )
        assert topup.status_code == 200
        key = {"idempotency-key": "invoice-2027-01"}
        topup = admin(
            gw, "POST", "/v1/customers/c/balances/credits/topup", json={"amount": 50}, headers=key
        )
        assert topup.status_code == 200
        assert httpx.get(f"{gw.proxy}/v1/b", headers={**auth(), **key}).status_code == 200
        assert books(gw, "c") == (2, 198, 0, 198)


def test_a_response_too_large_to_store_is_metered_again(
    tmp_path: Path, upstream: tuple[str, Upstream], redis_server: RedisProcess
) -> None:
    """A keyed request whose response was over idempotency.max_response_bytes is forwarded and
    charged again when retried; one that fits is replayed free."""
    redis_server.client().flushall()
    url, app = upstream
    config = gateway_config(url, redis_server.url, {"c": 100})
    config["idempotency"] = {"max_response_bytes": 10}
    with serve(tmp_path, config) as gw:
        headers = {**auth(), "idempotency-key": "big"}
        for _ in range(2):
            response = httpx.get(f"{gw.proxy}/v1/big", headers=headers, timeout=10)
            assert response.status_code == 200
            assert "idempotent-replayed" not in response.headers
        assert app.hits == ["/v1/big", "/v1/big"]
        assert books(gw, "c") == (2, 98, 0, 98)
