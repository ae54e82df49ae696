"""The standalone reverse proxy: an ASGI app forwarding to `proxy.upstream`, metered.

Bodies stream in both directions without being buffered whole. Hop-by-hop fields (RFC 9110 7.6.1)
and the customer's API key never cross; `X-Forwarded-*` are trusted only from `trusted_proxies`;
the upstream origin is fixed at start and no request path can change it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Callable

import aiohttp
import yarl

from metergate.asgi import MeteringMiddleware, Receive, Scope, Send
from metergate.config import GatewayConfig
from metergate.core.framing import framing_problem
from metergate.core.http import GATEWAY_ANSWER, Answer, problem
from metergate.core.paths import BadPath, bad_request, normal_scope
from metergate.fairness import CustomerSlots
from metergate.meter import AsyncMeter, ConfigSource, as_config

__all__ = ["ProxyApp", "create_app"]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)


async def send_answer(send: Send, answer: Answer) -> None:
    """Send a complete answer of the gateway itself (status, headers, body) on an ASGI connection.

    It is marked as the gateway's own (GATEWAY_ANSWER), so the metering around the proxy refunds
    the request's admission: the customer did not get the upstream's response."""
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
    await send(
        {
            "type": "http.response.start",
            "status": answer.status,
            "headers": raw,
            GATEWAY_ANSWER: True,
        }
    )
    await send({"type": "http.response.body", "body": answer.body})


# From a peer that is not a trusted proxy, none of these is believed or passed on: each names a
# client address, port, prefix or original URL that upstreams use for logs, redirects or access
# rules (RFC 7239 `Forwarded` and the de facto X-* fields).
SPOOFABLE = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"true-client-ip",
        b"x-client-ip",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-original-url",
        b"x-rewrite-url",
    }
)

CUSTOMER = "metergate.customer"
"""The scope key where the metering middleware leaves the customer of an admitted request."""


class BodyTooLarge(Exception):
    """The request body passed `proxy.max_body_bytes` while streaming."""


class BodyTimeout(Exception):
    """The next chunk of the request body did not come within `proxy.body_timeout_s`."""


def _strip_hop_by_hop(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    named = set(HOP_BY_HOP)
    for k, v in headers:
        if k.lower() == b"connection":
            named |= {t.strip().lower() for t in v.decode("latin-1").split(",") if t.strip()}
    return [(k, v) for k, v in headers if k.decode("latin-1").lower() not in named]


class ProxyApp:
    """Forward each request to the upstream and stream the response back."""

    def __init__(self, config: GatewayConfig, session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        proxy = config.proxy
        upstream = yarl.URL(proxy.upstream)
        self.origin = str(upstream.origin())
        self.timeout_s = float(proxy.timeout_s)
        self.body_timeout_s = float(proxy.body_timeout_s)
        self.max_connections = proxy.max_connections
        self.slots = CustomerSlots(proxy.max_connections_per_customer)
        self.session = session
        self._loop: asyncio.AbstractEventLoop | None = None
        self.max_body = proxy.max_body_bytes
        self.identity_header = config.identity.header.lower().encode("latin-1")
        self.trusted = [ipaddress.ip_network(c, strict=False) for c in proxy.trusted_proxies]

    def _trusted(self, peer: str | None) -> bool:
        if not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self.trusted)

    def _request_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        client = scope.get("client")
        peer = client[0] if client else ""
        trusted = self._trusted(peer)
        incoming = _strip_hop_by_hop(list(scope["headers"]))
        out: list[tuple[bytes, bytes]] = []
        forwarded: dict[bytes, bytes] = {}
        host = b""
        for k, v in incoming:
            key = k.lower()
            if key == self.identity_header or key == b"host" or key == b"content-length":
                if key == b"host":
                    host = v
                continue
            if key in SPOOFABLE and not trusted:
                continue
            if key in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"):
                if trusted:
                    forwarded[key] = forwarded[key] + b", " + v if key in forwarded else v
                continue
            out.append((k, v))
        chain = forwarded.get(b"x-forwarded-for")
        peer_b = peer.encode("latin-1")
        out.append((b"x-forwarded-for", chain + b", " + peer_b if chain else peer_b))
        out.append(
            (b"x-forwarded-proto", forwarded.get(b"x-forwarded-proto", scope["scheme"].encode()))
        )
        if host or b"x-forwarded-host" in forwarded:
            out.append((b"x-forwarded-host", forwarded.get(b"x-forwarded-host", host)))
        return out

    def _url(self, scope: Scope) -> yarl.URL:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if not raw_path.startswith(b"/"):
            raw_path = b"/" + raw_path
        query: bytes = scope.get("query_string", b"")
        target = (raw_path + (b"?" + query if query else b"")).decode("latin-1")
        # The origin is fixed text before the path: `//evil/x` or `/http://evil` stay paths.
        return yarl.URL(self.origin + target, encoded=True)

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self.session is None or self.session.closed or self._loop is not loop:
            self._loop = loop
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300),
                # `connect` covers the wait for a pooled connection too: 504 after timeout_s.
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=self.timeout_s,
                    sock_connect=self.timeout_s,
                    sock_read=self.timeout_s,
                ),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self.session

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            scope = normal_scope(scope)  # already, behind the metering middleware
        except BadPath as exc:
            await send_answer(send, bad_request(exc))
            return
        ambiguous = framing_problem(scope.get("http_version", "1.1"), scope["headers"])
        if ambiguous is not None:
            # `metergate serve` refuses these before any app runs; other servers get this.
            await send_answer(send, _closing(problem("bad-request", 400, ambiguous)))
            return
        headers = dict((k.lower(), v) for k, v in scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await send_answer(send, _too_large(self.max_body))
            return
        client = scope.get("client")
        who = scope.get(CUSTOMER) or f"peer:{client[0] if client else ''}"
        loop = asyncio.get_running_loop()
        started = loop.time()
        if not await self.slots.acquire(who, self.timeout_s):
            await send_answer(send, _timed_out())
            return
        try:
            left = max(0.001, self.timeout_s - (loop.time() - started))
            await self._exchange(scope, receive, send, headers, length, left)
        finally:
            self.slots.release(who)

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        length: bytes | None,
        connect_s: float,
    ) -> None:
        """Forward one request and stream the answer back, within `connect_s` to connect."""

        body_read = False

        async def body() -> AsyncIterator[bytes]:
            nonlocal body_read
            seen = 0
            while True:
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout_s)
                except TimeoutError:
                    raise BodyTimeout from None
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                seen += len(chunk)
                if seen > self.max_body:
                    raise BodyTooLarge
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    body_read = True
                    return

        out_headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in self._request_headers(scope)
        ]
        if length is not None:
            out_headers.append(("Content-Length", length.decode("latin-1")))
        has_body = length not in (None, b"0") or b"transfer-encoding" in headers
        try:
            response = await self._session().request(
                scope["method"],
                self._url(scope),
                headers=out_headers,
                data=body() if has_body else None,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
                allow_redirects=False,
                compress=None,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=connect_s,
                    sock_connect=self.timeout_s,
                    sock_read=self.timeout_s,
                ),
            )
        except BodyTooLarge:
            await send_answer(send, _too_large(self.max_body))
            return
        except BodyTimeout:
            await send_answer(send, _body_timeout(self.body_timeout_s))
            return
        except ClientGone:
            return
        except (TimeoutError, aiohttp.ServerTimeoutError):
            await send_answer(send, _timed_out())
            return
        except aiohttp.ClientError as exc:
            if isinstance(exc.__cause__, BodyTooLarge) or "BodyTooLarge" in repr(exc):
                await send_answer(send, _too_large(self.max_body))
                return
            if isinstance(exc.__cause__, BodyTimeout) or "BodyTimeout" in repr(exc):
                await send_answer(send, _body_timeout(self.body_timeout_s))
                return
            detail = f"the upstream is unreachable ({type(exc).__name__})"
            await send_answer(send, problem("bad-gateway", 502, detail))
            return
        watcher = None
        if body_read or not has_body:
            # Only a disconnect can arrive now: on one, stop reading the upstream (an LLM server
            # stops generating when its client goes) instead of streaming to nobody.
            watcher = asyncio.ensure_future(_close_on_disconnect(receive, response))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    # RFC 9110 6.6.1: one Date; the server that answers adds its own
                    "headers": [
                        (k, v)
                        for k, v in _strip_hop_by_hop(list(response.raw_headers))
                        if k.lower() != b"date"
                    ],
                }
            )
            # With a Content-Length, the chunk that completes it is the last message: the
            # metering around settles before it leaves, so a client that has read the whole
            # response finds it settled.
            size, sent, ended = response.content_length, 0, False
            async for chunk in response.content.iter_any():
                sent += len(chunk)
                ended = size is not None and sent >= size
                await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
                if ended:
                    break
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (aiohttp.ClientError, TimeoutError, OSError):
            # The upstream or the client went away mid-body: nothing more can be said on this
            # response; the metering middleware settles in its finally block.
            pass
        finally:
            if watcher is not None:
                watcher.cancel()
            response.release()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _close_on_disconnect(receive: Receive, response: aiohttp.ClientResponse) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    response.close()


class ClientGone(Exception):
    """The client disconnected while its request body was being forwarded."""


def _too_large(limit: int) -> Answer:
    return problem("body-too-large", 413, f"the request body exceeds {limit} bytes")


def _timed_out() -> Answer:
    return problem("gateway-timeout", 504, "the upstream did not answer in time")


def _body_timeout(limit_s: float) -> Answer:
    detail = f"the request body stalled for more than {limit_s:g} s"
    return _closing(problem("request-timeout", 408, detail))


def _closing(answer: Answer) -> Answer:
    """The answer, with `Connection: close`: the server closes the connection after it."""
    return Answer(answer.status, [*answer.headers, ("connection", "close")], answer.body)


def create_app(
    config: ConfigSource,
    *,
    meter: AsyncMeter | None = None,
    clock: Callable[[], float] | None = None,
    session: aiohttp.ClientSession | None = None,
) -> MeteringMiddleware:
    """Return the metered reverse proxy as an ASGI app."""
    cfg = as_config(config)
    return MeteringMiddleware(ProxyApp(cfg, session), cfg, meter=meter, clock=clock)
