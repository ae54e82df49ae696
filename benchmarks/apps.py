"""The apps under test, as factories a server process calls (uvicorn --factory, gunicorn, waitress).

They read the private Redis URL from MG_BENCH_REDIS and the proxy upstream from MG_BENCH_UPSTREAM.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import scenario
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

PAYLOAD = {"hello": "world"}
SHIMS: list[str] = []


def _shim_uvloop_transport() -> None:
    """Let the pipelined Redis connection accept uvloop's transports, while src/ rejects them.

    `metergate.storage.pipelined._Protocol.connection_made` asserts `isinstance(transport,
    asyncio.Transport)`; uvloop's TCPTransport does not subclass it, so under uvloop every admission
    fails with StorageUnavailable (503). The replacement is the same method without the assert. It
    is applied only while the shipped method fails on a transport that is not asyncio's, and the
    run records it (`shims` in latest.json).
    """
    from metergate.storage import pipelined

    original = pipelined._Protocol.connection_made
    probe = object.__new__(pipelined._Protocol)
    try:
        original(probe, object())  # type: ignore[arg-type]
        return
    except AssertionError:
        pass

    def connection_made(self: Any, transport: Any) -> None:
        try:
            original(self, transport)
        except AssertionError:
            self.transport = transport

    pipelined._Protocol.connection_made = connection_made  # type: ignore[method-assign]
    SHIMS.append("pipelined-uvloop-transport")
    os.environ["MG_BENCH_SHIMS"] = ",".join(SHIMS)


_shim_uvloop_transport()


def _redis() -> str:
    return os.environ["MG_BENCH_REDIS"]


def _proxy_config() -> dict[str, Any]:
    return scenario.gateway_config(_redis(), upstream=os.environ["MG_BENCH_UPSTREAM"])


async def _hello(request: Request) -> JSONResponse:
    return JSONResponse(PAYLOAD)


async def _ready(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def starlette_bare() -> Starlette:
    """The bare Starlette app: GET /v1/hello answers a small JSON document."""
    return Starlette(routes=[Route(scenario.PATH, _hello), Route("/ready", _ready)])


def starlette_metered() -> Any:
    """The Starlette app in MeteringMiddleware: one admission (quota + credit charge) a request."""
    from metergate import MeteringMiddleware

    return MeteringMiddleware(starlette_bare(), scenario.gateway_config(_redis()))


def starlette_slowapi() -> Starlette:
    """The Starlette app rate limited per API key by slowapi + limits on the same Redis."""
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded

    def api_key(request: Request) -> str:
        return request.headers.get("authorization", "")

    limiter = Limiter(key_func=api_key, storage_uri=_redis())

    @limiter.limit("1000000000/minute")
    async def hello(request: Request) -> JSONResponse:
        return JSONResponse(PAYLOAD)

    app = Starlette(routes=[Route(scenario.PATH, hello), Route("/ready", _ready)])
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    return app


def flask_bare() -> Any:
    """The bare Flask app: GET /v1/hello answers a small JSON document."""
    from flask import Flask

    app = Flask("bench")
    app.add_url_rule(scenario.PATH, "hello", lambda: PAYLOAD)
    app.add_url_rule("/ready", "ready", lambda: "ok")
    return app


def flask_metered() -> Any:
    """The Flask app with WSGIMeteringMiddleware around its wsgi_app (as Flask's docs wrap it)."""
    from metergate import WSGIMeteringMiddleware

    app = flask_bare()
    app.wsgi_app = WSGIMeteringMiddleware(app.wsgi_app, scenario.gateway_config(_redis()))
    return app


def proxy_metergate() -> Any:
    """metergate.create_app: the shipped metered reverse proxy (httpx.AsyncClient)."""
    from metergate import create_app

    return create_app(_proxy_config())


def _metered_proxy(kind: str) -> Callable[[], Any]:
    def factory() -> Any:
        import proxies

        from metergate import MeteringMiddleware, parse_config

        config = parse_config(_proxy_config())
        return MeteringMiddleware(getattr(proxies, kind)(config), config)

    factory.__doc__ = f"The metered reverse proxy with {kind} as its upstream client."
    return factory


def _bare_proxy(kind: str) -> Callable[[], Any]:
    def factory() -> Any:
        import proxies

        from metergate import parse_config

        return getattr(proxies, kind)(parse_config(_proxy_config()))

    factory.__doc__ = f"The reverse proxy with {kind} as its upstream client, not metered."
    return factory


def proxy_metergate_unmetered() -> Any:
    """The shipped ProxyApp (httpx.AsyncClient) without the metering middleware."""
    from metergate import parse_config
    from metergate.proxy import ProxyApp

    return ProxyApp(parse_config(_proxy_config()))


proxy_httpx_client = _metered_proxy("HttpxClientProxy")
proxy_httpx_transport = _metered_proxy("HttpxTransportProxy")
proxy_httpcore = _metered_proxy("HttpcoreProxy")
proxy_aiohttp = _metered_proxy("AiohttpProxy")
proxy_lean = _metered_proxy("LeanProxy")
raw_httpx_client = _bare_proxy("HttpxClientProxy")
raw_httpx_transport = _bare_proxy("HttpxTransportProxy")
raw_httpcore = _bare_proxy("HttpcoreProxy")
raw_aiohttp = _bare_proxy("AiohttpProxy")
raw_lean = _bare_proxy("LeanProxy")
