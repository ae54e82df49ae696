"""The adapter suite's world: one test app in ASGI and WSGI form, its config, real servers.

The app behaves the same in both forms and is steered by request headers, so every test runs
unchanged against `MeteringMiddleware` (served by uvicorn) and `WSGIMeteringMiddleware` (served
by a threaded wsgiref server):

- `x-mode`: `plain` (default), `teapot` (its own status, headers and binary body), `stream`
  (chunks), `raise` (raises before answering), `raise-mid` (raises after the first chunk);
- `x-tokens`: the app answers `X-Usage-Tokens: <value>` (the response-priced cost);
- `x-chunks`, `x-delay-ms`: how many chunks to stream, and the pause before each (or, in `plain`
  mode, before answering).
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import uvicorn
from tests.builders import asset, counters, customer, metric, plan, route, tier

# 2027-01-15T08:00:00Z (the `clock` fixture) lies in the calendar month [2027-01-01, 2027-02-01).
MONTH_START = 1_798_761_600
MONTH_END = 1_801_440_000
DAY_END = 1_800_057_600

TEAPOT_BODY = b"short and stout\x00\xff\r\n"
TEAPOT_HEADERS = [
    ("content-type", "application/octet-stream"),
    ("x-app", "teapot"),
    ("set-cookie", "a=1; Path=/"),
    ("set-cookie", "b=2; Path=/"),
    ("cache-control", "no-store"),
]


CONFIG: dict[str, Any] = {
    "metrics": {
        **counters("calls", "capped", "burst", unit="requests"),
        "tokens": metric(unit="tokens"),
        "in_flight": metric("UpDownCounter", unit="requests"),
    },
    "plans": {
        "pro": plan(
            calls=asset(tier(0, per_unit=1), period="month", balance="credits"),
            capped=asset(
                tier(0), tier(8, "Warning"), tier(10, "OverUsage", "Deny"), period="month"
            ),
            burst=asset(
                tier(0, "Critical", "RateLimit", rate={"limit": 2, "per": "1m"}), period="day"
            ),
            tokens=asset(tier(0, per_unit=1), period="month", balance="credits"),
            in_flight=asset(tier(0), tier(2, "OverUsage", "Deny")),
        ),
        "free": plan(calls=asset(tier(0), period="month")),
    },
    "customers": {
        "acme": customer("pro", credits=1000, api_keys=["acme-key"]),
        "broke": customer("pro", credits=0, api_keys=["broke-key"]),
        "freebie": customer("free", api_keys=["free-key"]),
    },
    "routes": [
        route("/healthz"),
        route(
            "/v1/chat",
            {"metric": "tokens", "cost": {"response_header": "X-Usage-Tokens", "reserve": 50}},
            "in_flight",
            methods=["POST"],
        ),
        route("/v1/capped", "capped"),
        route("/v1/burst", "burst"),
        route("/v1/concurrent", "in_flight"),
        route("/v1/weighted", {"metric": "calls", "cost": {"header": "X-Weight"}}),
        route("/v1/{rest:path}", "calls", methods=["GET", "POST"]),
    ],
}

ACME = {"authorization": "Bearer acme-key"}


class Seen:
    """What reached the wrapped app: one (method, path) per request, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.active = 0
        self.most_active = 0

    def add(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def enter(self) -> None:
        """Count a request the app starts working on."""
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)

    def leave(self) -> None:
        """Count a request the app is done with."""
        with self._lock:
            self.active -= 1

    def paths(self) -> list[str]:
        with self._lock:
            return [path for _, path in self.requests]


def _plan(headers: dict[str, str]) -> tuple[str, list[tuple[str, str]], int, float]:
    mode = headers.get("x-mode", "plain")
    extra = [("x-usage-tokens", headers["x-tokens"])] if "x-tokens" in headers else []
    return (
        mode,
        extra,
        int(headers.get("x-chunks", "3")),
        int(headers.get("x-delay-ms", "0")) / 1000,
    )


def asgi_app(seen: Seen) -> Callable[..., Any]:
    """The test app as a raw ASGI 3 application (with a lifespan that just says yes)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "http"
        seen.add(scope["method"], scope["path"])
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        mode, extra, chunks, delay = _plan(headers)
        if mode == "raise":
            raise RuntimeError("the app failed before answering")
        if mode == "teapot":
            raw = [(k.encode(), v.encode()) for k, v in TEAPOT_HEADERS]
            await send({"type": "http.response.start", "status": 418, "headers": raw})
            await send({"type": "http.response.body", "body": TEAPOT_BODY})
            return
        start_headers = [(b"content-type", b"text/plain"), (b"x-app", b"test")]
        start_headers += [(k.encode(), v.encode()) for k, v in extra]
        if mode in ("stream", "raise-mid"):
            disconnected = asyncio.Event()

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                disconnected.set()

            watcher = asyncio.ensure_future(watch())
            try:
                await send({"type": "http.response.start", "status": 200, "headers": start_headers})
                for i in range(chunks):
                    if mode == "raise-mid" and i == 1:
                        raise RuntimeError("the app failed in the middle of its body")
                    if delay:
                        await asyncio.sleep(delay)
                    if disconnected.is_set():
                        return
                    body = f"chunk {i}\n".encode()
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                watcher.cancel()
            return
        seen.enter()
        try:
            await asyncio.sleep(delay)
        finally:
            seen.leave()
        body = json.dumps({"path": scope["path"], "method": scope["method"]}).encode()
        start_headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": start_headers})
        await send({"type": "http.response.body", "body": body})

    return app


def wsgi_app(seen: Seen) -> Callable[..., Iterable[bytes]]:
    """The test app as a WSGI application."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
        seen.add(method, path)
        headers = {
            k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")
        }
        mode, extra, chunks, delay = _plan(headers)
        if mode == "raise":
            raise RuntimeError("the app failed before answering")
        if mode == "teapot":
            start_response("418 I'm a teapot", list(TEAPOT_HEADERS))
            return [TEAPOT_BODY]
        start_headers = [("content-type", "text/plain"), ("x-app", "test"), *extra]
        if mode in ("stream", "raise-mid"):
            start_response("200 OK", start_headers)

            def stream() -> Iterator[bytes]:
                for i in range(chunks):
                    if mode == "raise-mid" and i == 1:
                        raise RuntimeError("the app failed in the middle of its body")
                    if delay:
                        time.sleep(delay)
                    yield f"chunk {i}\n".encode()

            return stream()
        seen.enter()
        try:
            time.sleep(delay)
        finally:
            seen.leave()
        body = json.dumps({"path": path, "method": method}).encode()
        start_response("200 OK", [*start_headers, ("content-length", str(len(body)))])
        return [body]

    return app


def _loopback_socket() -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on accepted sockets of a TCP-typed socket,
    # and without it every keep-alive response waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve_asgi(app: Any, lifespan: str = "on", loop: str = "asyncio") -> Iterator[str]:
    """Run uvicorn in a thread on a free loopback port; yield its base URL; stop it afterwards."""
    sock = _loopback_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="critical",
        lifespan=lifespan,
        access_log=False,
        timeout_graceful_shutdown=2,
        ws="none",
        loop=loop,
        interface="asgi3",
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    # Signal handlers can only be installed from the main thread; uvicorn skips them elsewhere.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.002)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 128


class _QuietHandler(WSGIRequestHandler):
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def get_stderr(self) -> io.StringIO:
        # wsgiref prints the app's tracebacks here; the tests provoke them on purpose.
        return io.StringIO()


@contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    """Run a threaded wsgiref server in a thread on a free loopback port; yield its base URL."""
    server = make_server(
        "127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class Switch:
    """A server's application, swapped by each test: one server serves the whole session."""

    def __init__(self) -> None:
        self.app: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Serve as ASGI: answer the server's lifespan, hand everything else to the current app."""
        if scope["type"] == "lifespan":
            self.loop = asyncio.get_running_loop()
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await self.app(scope, receive, send)

    def wsgi(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        """Serve as WSGI: hand the request to the current app."""
        app = self.app
        return app(environ, start_response)  # type: ignore[no-any-return]

    def run(self, coroutine: Any, timeout: float = 10) -> Any:
        """Run a coroutine on the ASGI server's event loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Return `check()` once it passes (no AssertionError), retrying until `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def assert_problem(response: Any, status: int, slug: str, **fields: Any) -> dict[str, Any]:
    """Check an RFC 9457 answer: status, media type, our `type` URN, and the given members."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == f"urn:metergate:problem:{slug}"
    assert body["status"] == status
    assert body["title"] and body["detail"]
    for name, value in fields.items():
        assert body.get(name) == value, (name, body)
    return body


def sf_items(header: str) -> dict[str, dict[str, Any]]:
    """Parse a RateLimit or RateLimit-Policy field (an SF List) into {name: parameters}."""
    import http_sfv

    parsed = http_sfv.List()
    parsed.parse(header.encode())
    return {str(item.value): dict(item.params) for item in parsed}
