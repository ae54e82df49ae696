"""The apps under test, as factories a server process calls (uvicorn --factory, gunicorn, waitress).

They read the private Redis URL from MG_BENCH_REDIS, the proxy upstream from MG_BENCH_UPSTREAM and
the number of customers of the `*_zipf` apps from MG_BENCH_CUSTOMERS.
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


def starlette_allowances() -> Any:
    """The Starlette app in MeteringMiddleware with local allowances: most requests admitted in
    process, from allowances taken (and settled) by one script call each."""
    from metergate import MeteringMiddleware

    config = scenario.gateway_config(_redis())
    config["allowances"] = {"enabled": True}
    return MeteringMiddleware(starlette_bare(), config)


def _zipf_config() -> dict[str, Any]:
    customers = int(os.environ["MG_BENCH_CUSTOMERS"])
    return scenario.gateway_config(_redis(), customers=customers)


def starlette_metered_zipf() -> Any:
    """`starlette_metered` with MG_BENCH_CUSTOMERS customers, each with its key and balance."""
    from metergate import MeteringMiddleware

    return MeteringMiddleware(starlette_bare(), _zipf_config())


def starlette_allowances_zipf() -> Any:
    """`starlette_allowances` with MG_BENCH_CUSTOMERS customers, each with its key and balance."""
    from metergate import MeteringMiddleware

    config = _zipf_config()
    config["allowances"] = {"enabled": True}
    return MeteringMiddleware(starlette_bare(), config)


class OneRoundTrip:
    """The floor of any metering middleware: one PING on metergate's pipelined connection per request.

    It decides nothing; what it costs is what asking Redis anything per request costs.
    """

    def __init__(self, app: Any, url: str) -> None:
        from metergate.storage.pipelined import PipelinedConnection

        self.app = app
        self.conn = PipelinedConnection(url)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self.conn.call("PING", timeout=1.0)
        await self.app(scope, receive, send)

    async def aclose(self) -> None:
        await self.conn.aclose()


def starlette_roundtrip() -> Any:
    """The bare app behind `OneRoundTrip`: the floor MeteringMiddleware is measured against."""
    return OneRoundTrip(starlette_bare(), _redis())


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


def flask_allowances() -> Any:
    """The Flask app with WSGIMeteringMiddleware and local allowances."""
    from metergate import WSGIMeteringMiddleware

    config = scenario.gateway_config(_redis())
    config["allowances"] = {"enabled": True}
    app = flask_bare()
    app.wsgi_app = WSGIMeteringMiddleware(app.wsgi_app, config)
    return app


def proxy_metergate() -> Any:
    """metergate.create_app: the shipped metered reverse proxy (metergate.upstream's pool)."""
    from metergate import create_app

    return create_app(_proxy_config())


def proxy_allowances() -> Any:
    """The shipped metered reverse proxy with local allowances."""
    from metergate import create_app

    config = _proxy_config()
    config["allowances"] = {"enabled": True}
    return create_app(config)


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
    """The shipped ProxyApp (metergate.upstream's pool) without the metering middleware."""
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
