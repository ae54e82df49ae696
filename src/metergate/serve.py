"""`metergate serve`: the reverse proxy, the admin API and the background worker in one process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import uvicorn

from metergate.admin import admin_app
from metergate.config import GatewayConfig
from metergate.http1 import protocol_class
from metergate.meter import AsyncMeter
from metergate.proxy import create_app

__all__ = ["serve"]

logger = logging.getLogger("metergate")


def _server(app: object, host: str, port: int, header_timeout_s: float = 10) -> uvicorn.Server:
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        # h11, made strict: ambiguous framing and slow request heads never reach the app.
        http=protocol_class(header_timeout_s),
        access_log=False,
        # X-Forwarded-* are metergate's to judge (proxy.trusted_proxies), not uvicorn's.
        proxy_headers=False,
        server_header=False,
        log_level="warning",
        lifespan="on",
    )
    return uvicorn.Server(config)


async def serve(
    config: GatewayConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    admin_port: int | None = 8081,
    background: Callable[[AsyncMeter, asyncio.Event], Awaitable[None]] | None = None,
    ready: Callable[[], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve the proxy (and the admin API on its own port) until interrupted or `stop` is set."""
    meter = AsyncMeter(config)
    head_s = config.proxy.header_timeout_s
    servers = [_server(create_app(config, meter=meter), host, port, head_s)]
    if admin_port is not None:
        servers.append(_server(admin_app(config, meter=meter), host, admin_port, head_s))
    stop = stop or asyncio.Event()

    async def stop_servers() -> None:
        await stop.wait()
        for server in servers:
            server.should_exit = True

    watcher = asyncio.ensure_future(stop_servers())
    tasks = [asyncio.ensure_future(s.serve()) for s in servers]
    if background is not None:
        tasks.append(asyncio.ensure_future(background(meter, stop)))
    if ready is not None:
        while not all(s.started for s in servers):
            if any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.02)
        else:
            ready()
    try:
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        watcher.cancel()
        for server in servers:
            server.should_exit = True
        await meter.aclose()
