"""Fixtures: the metering middlewares around the test app, served for real, on every backend.

One uvicorn server and one threaded wsgiref server run for the whole session; each test puts
its own middleware (fresh config, fresh storage, its own clock) behind them.
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from conftest import Clock, RedisProcess, with_storage
from metergate import Meter, MeteringMiddleware, WSGIMeteringMiddleware

from .harness import CONFIG, Seen, Switch, asgi_app, serve_asgi, serve_wsgi, wsgi_app

ALLOWANCES = os.environ.get("METERGATE_TEST_ALLOWANCES") == "1"
"""Run the suite with local allowances on (the config's default is off)."""


@dataclass
class Gateway:
    """One middleware around the test app, served on loopback, with a Meter to look at storage."""

    kind: str
    url: str
    client: httpx.Client
    seen: Seen
    middleware: Any
    meter: Meter
    config: dict[str, Any]


@dataclass
class Served:
    """A running server and the switch choosing what it serves."""

    url: str
    switch: Switch


@pytest.fixture(scope="session")
def asgi_server() -> Iterator[Served]:
    """uvicorn in a thread for the whole session."""
    switch = Switch()
    with serve_asgi(switch.asgi) as url:
        yield Served(url, switch)


@pytest.fixture(scope="session")
def wsgi_server() -> Iterator[Served]:
    """A threaded wsgiref server in a thread for the whole session."""
    switch = Switch()
    with serve_wsgi(switch.wsgi) as url:
        yield Served(url, switch)


class Settled:
    """A Meter that first settles the middleware's allowances, so its reads see every request."""

    def __init__(self, meter: Meter, sync: Callable[[], Any]) -> None:
        self._meter = meter
        self._sync = sync

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._meter, name)
        if not callable(attr):
            return attr

        def synced(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            return attr(*args, **kwargs)

        return synced


@pytest.fixture(params=["asgi", "wsgi"])
def kind(request: pytest.FixtureRequest) -> str:
    """Which middleware a test runs: MeteringMiddleware (ASGI) or WSGIMeteringMiddleware."""
    return str(request.param)


def build_middleware(kind: str, config: dict[str, Any], seen: Seen, **options: Any) -> Any:
    """Wrap the test app of `kind` in its metering middleware."""
    if kind == "asgi":
        return MeteringMiddleware(asgi_app(seen), config, **options)
    return WSGIMeteringMiddleware(wsgi_app(seen), config, **options)


@pytest.fixture
def start_gateway(
    kind: str, clock: Clock, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Gateway]]:
    """Put the test app behind the `kind` middleware on a given config; take it down afterwards."""
    served: Served = request.getfixturevalue(f"{kind}_server")
    with ExitStack() as stack:

        def start(config: dict[str, Any], **options: Any) -> Gateway:
            seen = Seen()
            options.setdefault("clock", clock)
            middleware = build_middleware(kind, config, seen, **options)
            if kind == "asgi":
                # The AsyncMeter's connections belong to the server's loop: close them there.
                stack.callback(lambda: served.switch.run(middleware.meter.aclose()))
            else:
                stack.callback(middleware.meter.close)
            served.switch.app = middleware
            meter = Meter(config, clock=clock)
            stack.callback(meter.close)
            if middleware.meter.book is not None:
                # what the test reads must count what the middleware gave from its allowances
                if kind == "asgi":
                    meter = Settled(meter, lambda: served.switch.run(middleware.meter.sync()))
                else:
                    meter = Settled(meter, middleware.meter.sync)
            client = httpx.Client(base_url=served.url, timeout=10)
            stack.callback(client.close)
            return Gateway(kind, served.url, client, seen, middleware, meter, config)

        yield start


@pytest.fixture(params=["memory", "redis"])
def storage_url(request: pytest.FixtureRequest) -> str:
    """A fresh storage URL: embedded, or a flushed redis-server (Cluster is the storage suite's)."""
    if request.param == "memory":
        return f"memory://test-{uuid.uuid4().hex}"
    server: RedisProcess = request.getfixturevalue("redis_server")
    client = server.client()
    client.flushall()
    client.close()
    return server.url


@pytest.fixture
def gateway_config(storage_url: str) -> dict[str, Any]:
    """The test config on this test's storage backend (a deep copy, free to change)."""
    config = with_storage(copy.deepcopy(CONFIG), storage_url)
    if ALLOWANCES:
        config["allowances"] = {"enabled": True}
    return config


@pytest.fixture
def gateway(start_gateway: Callable[..., Gateway], gateway_config: dict[str, Any]) -> Gateway:
    """The test app behind the middleware, on this test's backend, with the test clock."""
    return start_gateway(gateway_config)
