"""Worker fixtures: HTTP servers on free ports (uvicorn in a thread) and helpers to drive a pass."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from conftest import free_port
from metergate.config import GatewayConfig, StorageConfig, parse_config
from metergate.storage import AsyncStorage, open_async

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3"  # 30 bytes


class Server:
    """A Starlette app served by uvicorn in a thread on a loopback port; it can stop and restart."""

    def __init__(self, app: Starlette, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="critical",
            lifespan="off",
            http="h11",
            ws="none",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
            self._server = self._thread = None


@contextmanager
def serving(app: Starlette, port: int | None = None) -> Iterator[Server]:
    """Serve an app for the duration of the block."""
    server = Server(app, port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Received:
    """One request a fake server got."""

    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Recorder:
    """A fake HTTP server's memory and script: every request is recorded, answers are queued.

    `answers` is consumed one per request; once empty, `default` answers (status, headers, body).
    """

    default: tuple[int, dict[str, str], bytes] = (204, {}, b"")
    answers: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    fail_when: bytes | None = None
    """While set, a request whose body contains these bytes gets a 503."""

    def answer(self, status: int, headers: dict[str, str] | None = None, body: Any = b"") -> None:
        """Queue the answer to one upcoming request."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers.append((status, headers or {}, raw))

    def app(self) -> Starlette:
        async def endpoint(request: Request) -> Response:
            body = await request.body()
            with self.lock:
                self.requests.append(Received(request.url.path, dict(request.headers), body))
                status, headers, content = self.answers.pop(0) if self.answers else self.default
                if self.fail_when is not None and self.fail_when in body:
                    status, headers, content = 503, {}, b""
            return Response(content, status_code=status, headers=headers)

        return Starlette(routes=[Route("/{path:path}", endpoint, methods=["POST"])])

    def ids(self) -> list[str]:
        """The webhook-id of every request received, in order."""
        return [r.headers.get("webhook-id", "") for r in self.requests]


@pytest.fixture
def receiver() -> Iterator[tuple[Recorder, Server]]:
    """A webhook receiver answering 204 unless told otherwise."""
    recorder = Recorder()
    with serving(recorder.app()) as server:
        yield recorder, server


def gateway(storage_url: str, webhooks: list[dict[str, Any]], **extra: Any) -> GatewayConfig:
    """A small config: 4 partitions, the given webhooks, a 60 s usage interval."""
    data: dict[str, Any] = {
        "storage": {"url": storage_url, "partitions": 4, "timeout_ms": 2000},
        "webhooks": webhooks,
        "usage_report_interval": "60s",
        **extra,
    }
    return parse_config(data)


def run(scenario: Callable[[AsyncStorage], Awaitable[None]], storage_url: str) -> None:
    """Run an async scenario against a fresh async driver for the URL, closing it afterwards."""

    async def main() -> None:
        storage = open_async(StorageConfig(url=storage_url, timeout_ms=2000))
        try:
            await scenario(storage)
        finally:
            await storage.aclose()
            # aclose() leaves an explicitly passed connection pool open: close it too.
            pool = getattr(storage.client, "connection_pool", None)
            if pool is not None:
                await pool.disconnect()

    asyncio.run(main())
