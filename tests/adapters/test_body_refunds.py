"""Refunds of responses whose cost is read from their body, over real servers, in all three modes.

The route of `test_body_costs` (tokens read from `/usage/total_tokens`, `max_tokens` held while
the response runs) with a price on each request too, so a refund has both a charge and a hold to
undo. The app answers the status the request names (`x-status`) with a body reporting usage:
JSON, or an event stream that the app breaks off after its usage event (`x-shape: sse-dies`).
It runs behind the ASGI middleware (uvicorn), the WSGI middleware (wsgiref) and the reverse proxy
(uvicorn in front of the app on uvicorn, where the upstream dying mid-stream cuts the response).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httpx
import pytest

from conftest import Clock, free_port, with_storage
from metergate import Meter, MeteringMiddleware, WSGIMeteringMiddleware, create_app

from .conftest import Served
from .harness import eventually, serve_asgi
from .test_body_costs import CONFIG, KEY, chat

USAGE = 37
"""The tokens every answer of the app reports."""
PRICE = 2
"""The credits each request costs up front."""
RESERVE = 50
"""The tokens (and credits) held while a response runs: the request's max_tokens."""
START = 100_000

PATH = "/v1/chat/completions"


def _json_body(status: int) -> bytes:
    return json.dumps(
        {"error": {"message": HTTPStatus(status).phrase}, "usage": {"total_tokens": USAGE}}
    ).encode()


USAGE_EVENT = b"data: " + json.dumps({"choices": [], "usage": {"total_tokens": USAGE}}).encode()
USAGE_EVENT += b"\n\n"


async def app_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer `x-status` with a JSON body reporting usage, or an event stream that breaks off."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = dict(scope["headers"])
    status = int(headers.get(b"x-status", b"200"))
    while (await receive()).get("more_body", False):
        pass
    if headers.get(b"x-shape") == b"sse-dies":
        start = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": status, "headers": start})
        await send({"type": "http.response.body", "body": USAGE_EVENT, "more_body": True})
        await asyncio.sleep(0.05)  # the event leaves before the connection breaks
        raise RuntimeError("the app failed in the middle of its stream")
    body = _json_body(status)
    start = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


def app_wsgi(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    """The WSGI twin of `app_asgi`."""
    status = int(environ.get("HTTP_X_STATUS", "200"))
    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    line = f"{status} {HTTPStatus(status).phrase}"
    if environ.get("HTTP_X_SHAPE") == "sse-dies":
        start_response(line, [("Content-Type", "text/event-stream")])

        def stream() -> Iterator[bytes]:
            yield USAGE_EVENT
            raise RuntimeError("the app failed in the middle of its stream")

        return stream()
    body = _json_body(status)
    start_response(line, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return iter([body])


@pytest.fixture(scope="module")
def app_upstream() -> Iterator[str]:
    """The app on uvicorn, for the proxy to forward to."""
    with serve_asgi(app_asgi) as url:
        yield url


@dataclass
class Books:
    """The app behind metering in one mode, and a Meter to look at storage."""

    mode: str
    client: httpx.Client
    meter: Meter

    def state(self) -> tuple[int, int, int, int, int, int]:
        """(tokens counted, tokens pending, requests counted, credits, available, held)."""
        tokens = self.meter.usage("acme", "tokens")
        requests = self.meter.usage("acme", "requests")
        balance = self.meter.balance("acme", "credits")
        return (
            int(tokens["value"]),
            int(tokens["pending"]),
            int(requests["value"]),
            balance.amount,
            balance.available,
            balance.held,
        )

    def ledger(self) -> list[dict[str, Any]]:
        """The customer's ledger, newest line first."""
        return list(self.meter.ledger("acme", 1000))

    def post(self, status: int, shape: str = "json") -> bytes:
        """Send one chat request answered `status`; return the bytes the client received."""
        headers = {"x-status": str(status), "x-shape": shape}
        received = b""
        # A stream the app breaks off ends with a broken connection, not a clean end.
        with (
            contextlib.suppress(httpx.RemoteProtocolError),
            self.client.stream("POST", PATH, json=chat(max_tokens=RESERVE), headers=headers) as r,
        ):
            assert r.status_code == status
            for chunk in r.iter_bytes():
                received += chunk
        return received


async def _close_session(proxy: Any) -> None:
    await proxy.aclose()


@pytest.fixture
def start_books(
    request: pytest.FixtureRequest, clock: Clock, asgi_server: Served, wsgi_server: Served
) -> Iterator[Callable[..., Books]]:
    """Put the app behind metering in a mode, with a route's `refund_on`; take it down afterwards."""
    with ExitStack() as stack:

        def start(
            mode: str, storage_url: str, refund_on: list[Any] | None = None, upstream: str = ""
        ) -> Books:
            config = with_storage(copy.deepcopy(CONFIG), storage_url)
            requests = config["plans"]["llm"]["assets"]["requests"]
            requests["balance"] = "credits"
            requests["tiers"][0]["price"] = {"per_unit": PRICE}
            if refund_on is not None:
                config["routes"][0]["refund_on"] = refund_on
            served = wsgi_server if mode == "wsgi" else asgi_server
            if mode == "wsgi":
                app: Any = WSGIMeteringMiddleware(app_wsgi, config, clock=clock)
                stack.callback(app.meter.close)
            else:
                if mode == "proxy":
                    config["proxy"] = {
                        "upstream": upstream or request.getfixturevalue("app_upstream")
                    }
                    app = create_app(config, clock=clock)
                    proxy = app.app  # its session is closed by a lifespan the shared server keeps
                    stack.callback(lambda: served.switch.run(_close_session(proxy)))
                else:
                    app = MeteringMiddleware(app_asgi, config, clock=clock)
                stack.callback(lambda: served.switch.run(app.meter.aclose()))
            served.switch.app = app
            meter = Meter(config, clock=clock)
            stack.callback(meter.close)
            client = httpx.Client(base_url=served.url, timeout=30, headers=KEY)
            stack.callback(client.close)
            return Books(mode, client, meter)

        yield start


MODES = ["asgi", "wsgi", "proxy"]


def warmed(books: Books) -> tuple[int, ...]:
    """Serve one 200 (charged its usage and price) so the books are not empty; return the state
    after it."""
    assert json.loads(books.post(200))["usage"]["total_tokens"] == USAGE
    state = books.state()
    assert state == (USAGE, 0, 1, START - USAGE - PRICE, START - USAGE - PRICE, 0)
    return state


def assert_refunded_once(books: Books, before: tuple[int, ...], refunds: int = 1) -> None:
    """The books are as before the request, each refunded admission left one refund line giving
    its price back (its reserve was only held), and the ledger still adds up to the balance."""
    assert books.state() == before
    ledger = books.ledger()
    assert [line["delta"] for line in ledger if line["kind"] == "refund"] == [PRICE] * refunds
    assert sum(line["delta"] for line in ledger) == before[3]


def assert_charged_without_refund(books: Books) -> None:
    """The ledger has no refund line and adds up to the balance."""
    ledger = books.ledger()
    assert [line for line in ledger if line["kind"] == "refund"] == []
    assert sum(line["delta"] for line in ledger) == books.state()[3]


def _refunded(books: Books, before: tuple[int, ...], refunds: int = 1) -> None:
    # The middlewares refund before the last bytes leave; a broken-off stream is refunded when
    # the server gives up on it, which may be just after the client saw the break.
    eventually(lambda: assert_refunded_once(books, before, refunds), timeout=20)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("refund_on", "status"), [(None, 500), (["4xx"], 404), ([502], 502), (["5xx", 404], 404)]
)
def test_a_status_in_refund_on_is_refunded_whatever_usage_its_body_reports(
    start_books: Callable[..., Books],
    storage_url: str,
    mode: str,
    refund_on: list[Any] | None,
    status: int,
) -> None:
    """A response whose status is in the route's `refund_on` (default 5xx) costs nothing though its
    JSON body reports usage: units, credits and holds are as before, with one refund line."""
    books = start_books(mode, storage_url, refund_on)
    before = warmed(books)
    assert json.loads(books.post(status))["usage"]["total_tokens"] == USAGE  # the body reached us
    _refunded(books, before)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("refund_on", "status"), [([], 500), (["4xx"], 500), (None, 404)])
def test_a_status_outside_refund_on_is_charged_the_usage_its_body_reports(
    start_books: Callable[..., Books],
    storage_url: str,
    mode: str,
    refund_on: list[Any] | None,
    status: int,
) -> None:
    """A response whose status is not in `refund_on` (a 500 on `[]` or `[4xx]`, a 404 by default)
    is charged the usage its body reports, not the reserve, and refunds nothing."""
    books = start_books(mode, storage_url, refund_on)
    tokens, _, requests, amount, _, _ = warmed(books)
    books.post(status)
    after = START - 2 * (USAGE + PRICE)
    assert books.state() == (tokens + USAGE, 0, requests + 1, after, after, 0)
    assert amount - after == USAGE + PRICE
    assert_charged_without_refund(books)


@pytest.mark.parametrize("mode", MODES)
def test_a_500_stream_broken_off_after_its_usage_event_is_refunded(
    start_books: Callable[..., Books], storage_url: str, mode: str
) -> None:
    """An event stream answered 500 that reports usage and then breaks (the app raises; behind the
    proxy, the upstream connection dies) is refunded once: the books are as before."""
    books = start_books(mode, storage_url)
    before = warmed(books)
    assert books.post(500, "sse-dies") == USAGE_EVENT
    _refunded(books, before)


@pytest.mark.parametrize("mode", MODES)
def test_a_200_stream_broken_off_after_its_usage_event_is_charged_that_usage(
    start_books: Callable[..., Books], storage_url: str, mode: str
) -> None:
    """A stream answered 200 that breaks after reporting usage is not a refund (no rule names it):
    it is charged the usage reported, as when the client hangs up, and nothing stays held."""
    books = start_books(mode, storage_url)
    tokens, _, requests, _, _, _ = warmed(books)
    assert books.post(200, "sse-dies") == USAGE_EVENT
    after = START - 2 * (USAGE + PRICE)

    def charged() -> None:
        assert books.state() == (tokens + USAGE, 0, requests + 1, after, after, 0)

    eventually(charged, timeout=20)
    assert_charged_without_refund(books)


def test_the_proxys_502_for_a_dead_upstream_is_refunded_even_when_refund_on_is_empty(
    start_books: Callable[..., Books], storage_url: str
) -> None:
    """The proxy's own 502 (its upstream refuses connections) is refunded on a route that refunds
    no status: the gateway answered after admitting, so the books are as before."""
    books = start_books("proxy", storage_url, [], upstream=f"http://127.0.0.1:{free_port()}")
    before = books.state()
    assert before == (0, 0, 0, START, START, 0)
    response = books.client.post(PATH, json=chat(max_tokens=RESERVE))
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    _refunded(books, before)


@pytest.mark.parametrize("mode", MODES)
def test_many_refunded_requests_leave_nothing_held_or_charged(
    start_books: Callable[..., Books], storage_url: str, mode: str
) -> None:
    """Twenty refunded 500s in a row, JSON and broken streams, leave the books exactly as before:
    no hold piles up and each admission has its one refund line."""
    books = start_books(mode, storage_url)
    before = warmed(books)
    for i in range(20):
        books.post(500, "sse-dies" if i % 2 else "json")

    _refunded(books, before, 20)
