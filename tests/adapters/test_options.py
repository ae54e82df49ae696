"""Middleware options (identify, costs), the scopes ASGI leaves alone, and storage coming back."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from conftest import Clock, RedisProcess, with_storage
from metergate import InvalidAmount, MeteringMiddleware

from .conftest import Gateway
from .harness import ACME, CONFIG, assert_problem, eventually


def customer_header(kind: str) -> Callable[[Any], str | None]:
    """An `identify` callable reading `X-Customer` from the framework's request of `kind`."""
    if kind == "asgi":
        return lambda scope: dict(scope["headers"]).get(b"x-customer", b"").decode() or None
    return lambda environ: environ.get("HTTP_X_CUSTOMER")


def query_cost(kind: str) -> Callable[[Any], Any]:
    """A cost callable returning the `n` query parameter of the framework's request of `kind`."""

    def cost(request: Any) -> Any:
        query = request["query_string"].decode() if kind == "asgi" else request["QUERY_STRING"]
        value = parse_qs(query).get("n", ["1"])[0]
        return float(value) if "." in value else int(value)

    return cost


def test_custom_identify_replaces_the_key(
    start_gateway: Callable[..., Gateway], gateway_config: dict[str, Any], kind: str
) -> None:
    """A custom `identify` names the customer; no API key is needed, and None is a 401."""
    gateway = start_gateway(gateway_config, identify=customer_header(kind))
    response = gateway.client.get("/v1/anything", headers={"x-customer": "acme"})
    assert response.status_code == 200 and response.headers["metergate-balance"] == "999"
    assert_problem(gateway.client.get("/v1/anything", headers=ACME), 401, "unauthenticated")
    stranger = gateway.client.get("/v1/anything", headers={"x-customer": "stranger"})
    assert_problem(stranger, 401, "unauthenticated", customer="stranger")
    assert gateway.meter.usage("acme", "calls")["value"] == 1


@pytest.mark.parametrize("kind", ["asgi"])
def test_async_identify_is_awaited(
    start_gateway: Callable[..., Gateway], gateway_config: dict[str, Any]
) -> None:
    """The ASGI middleware awaits an `identify` coroutine function."""

    async def identify(scope: dict[str, Any]) -> str | None:
        await asyncio.sleep(0)
        return "acme"

    gateway = start_gateway(gateway_config, identify=identify)
    assert gateway.client.get("/v1/anything").headers["metergate-balance"] == "999"


def test_custom_cost_callable(
    start_gateway: Callable[..., Gateway], gateway_config: dict[str, Any], kind: str
) -> None:
    """A cost callable decides a request's units from the framework's request object."""
    gateway = start_gateway(gateway_config, costs={"calls": query_cost(kind)})
    assert (
        gateway.client.get("/v1/anything?n=5", headers=ACME).headers["metergate-balance"] == "995"
    )
    assert gateway.client.get("/v1/anything", headers=ACME).headers["metergate-balance"] == "994"
    assert gateway.meter.usage("acme", "calls")["value"] == 6


def test_cost_callable_returning_a_float_is_an_error(
    start_gateway: Callable[..., Gateway], gateway_config: dict[str, Any], kind: str
) -> None:
    """A cost callable returning a float is a programming error (a 500), never a rounded charge."""
    gateway = start_gateway(gateway_config, costs={"calls": query_cost(kind)})
    assert gateway.client.get("/v1/anything?n=2.5", headers=ACME).status_code == 500
    assert gateway.seen.paths() == []
    assert gateway.meter.usage("acme", "calls")["value"] == 0


def test_recorded_once_storage_is_back(
    start_gateway: Callable[..., Gateway], tmp_path: Path, clock: Clock
) -> None:
    """Requests let through while storage was down are recorded, once each, when it comes back."""
    redis_server = RedisProcess(tmp_path / "late-redis")
    config = with_storage(copy.deepcopy(CONFIG), redis_server.url)
    config["storage"]["on_failure"] = "open"
    gateway = start_gateway(config)
    try:
        retried = {**ACME, "idempotency-key": "retried"}
        for headers in (ACME, retried, retried):
            response = gateway.client.get("/v1/anything", headers=headers)
            assert response.headers["metergate-degraded"] == "?1"
        chat = gateway.client.post("/v1/chat", headers={**ACME, "x-tokens": "7"})
        assert chat.headers["metergate-degraded"] == "?1"
        redis_server.start()
        live = gateway.client.get("/v1/anything", headers=ACME)
        assert live.status_code == 200 and "metergate-degraded" not in live.headers

        def recorded() -> None:
            assert gateway.meter.usage("acme", "calls")["value"] == 3  # 1 + 1 retried + 1 live
            assert gateway.meter.usage("acme", "tokens")["value"] == 7
            assert gateway.meter.usage("acme", "in_flight")["value"] == 0
            assert gateway.meter.balance("acme", "credits").available == 1000 - 3 - 7

        eventually(recorded)
    finally:
        redis_server.stop()


def _asgi(gateway_config: dict[str, Any], app: Any) -> MeteringMiddleware:
    return MeteringMiddleware(app, gateway_config)


def test_websocket_scope_passes_untouched(gateway_config: dict[str, Any]) -> None:
    """A websocket scope on a metered path reaches the app as it was: no key, no metering."""
    calls: list[tuple[Any, Any, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append((scope, receive, send))

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "websocket", "path": "/v1/chat", "headers": [], "query_string": b""}
    middleware = _asgi(gateway_config, app)
    asyncio.run(middleware(scope, receive, send))
    assert calls == [(scope, receive, send)]


def test_lifespan_passes_through_and_closes_the_meter(gateway_config: dict[str, Any]) -> None:
    """Lifespan messages pass both ways unchanged; shutdown also closes the middleware's meter."""
    received: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []
    closed: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            received.append(message)
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    middleware = _asgi(gateway_config, app)
    aclose = middleware.meter.aclose

    async def tracked_aclose() -> None:
        closed.append(True)
        await aclose()

    middleware.meter.aclose = tracked_aclose  # type: ignore[method-assign]
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    assert received == [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert closed == [True]


def test_invalid_amount_reaches_the_developer(gateway_config: dict[str, Any]) -> None:
    """A negative cost from a callable raises InvalidAmount, naming the field, to the developer."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never reached")

    middleware = MeteringMiddleware(
        app, gateway_config, identify=lambda scope: "acme", costs={"calls": lambda scope: -1}
    )
    scope = {"type": "http", "method": "GET", "path": "/v1/x", "headers": [], "query_string": b""}

    async def run() -> None:
        try:
            await middleware(scope, _never, _discard)
        finally:
            await middleware.meter.aclose()

    with pytest.raises(InvalidAmount, match=r"amounts\.calls"):
        asyncio.run(run())


async def _never() -> dict[str, Any]:
    raise AssertionError("the body is never read")


async def _discard(message: dict[str, Any]) -> None:
    pass


def test_one_idempotency_key_does_not_buy_other_requests_while_storage_is_down(
    start_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    """Let through while storage is down, different requests sharing one Idempotency-Key are
    each charged once storage is back; only a true retry (same request) is recorded once."""
    redis_server = RedisProcess(tmp_path / "late-redis")
    config = with_storage(copy.deepcopy(CONFIG), redis_server.url)
    config["storage"]["on_failure"] = "open"
    gateway = start_gateway(config)
    try:
        keyed = {**ACME, "idempotency-key": "one-key"}
        sent = [("/v1/a", b"one"), ("/v1/b", b"one"), ("/v1/a", b"two"), ("/v1/a", b"one")]
        for path, body in sent:
            response = gateway.client.post(path, content=body, headers=keyed)
            assert response.headers["metergate-degraded"] == "?1"
        assert len(gateway.seen.paths()) == 4
        redis_server.start()

        def recorded() -> None:
            # three different requests; the fourth retries the first
            assert gateway.meter.usage("acme", "calls")["value"] == 3
            assert gateway.meter.balance("acme", "credits").available == 1000 - 3

        eventually(recorded)
    finally:
        redis_server.stop()
