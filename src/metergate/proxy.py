"""The standalone reverse proxy: an ASGI app forwarding to `proxy.upstream`, metered.

Bodies stream in both directions without being buffered whole. Hop-by-hop fields (RFC 9110 7.6.1)
and the customer's API key never cross; `X-Forwarded-*` are trusted only from `trusted_proxies`;
the upstream origin is fixed at start and no request path can change it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

from metergate.asgi import MeteringMiddleware, Receive, Scope, Send
from metergate.config import GatewayConfig
from metergate.core.framing import framing_problem
from metergate.core.http import GATEWAY_ANSWER, Answer, problem
from metergate.core.paths import BadPath, bad_request, normal_scope
from metergate.fairness import CustomerSlots
from metergate.meter import AsyncMeter, ConfigSource, as_config
from metergate.upstream import Response, UpstreamError, UpstreamPool, UpstreamTimeout

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
_HOP_BY_HOP = frozenset(name.encode("latin-1") for name in HOP_BY_HOP)
_NOT_RETURNED = _HOP_BY_HOP | {b"date"}  # RFC 9110 6.6.1: one Date; the answering server's
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})


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


def _connection_named(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """The field names listed in the Connection fields of `headers` (lowercased)."""
    named: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    named.discard(b"")
    return named


def _strip_hop_by_hop(
    headers: list[tuple[bytes, bytes]], drop: frozenset[bytes] = _HOP_BY_HOP
) -> list[tuple[bytes, bytes]]:
    """`headers` without hop-by-hop fields, those named in Connection, and `drop`."""
    named = _connection_named(headers)
    gone = drop | named if named else drop
    return [(k, v) for k, v in headers if k.lower() not in gone]


class ProxyApp:
    """Forward each request to the upstream and stream the response back."""

    def __init__(self, config: GatewayConfig, pool: UpstreamPool | None = None) -> None:
        self.config = config
        proxy = config.proxy
        upstream = urlsplit(proxy.upstream)
        self.timeout_s = float(proxy.timeout_s)
        self.body_timeout_s = float(proxy.body_timeout_s)
        self.max_connections = proxy.max_connections
        self.slots = CustomerSlots(proxy.max_connections_per_customer)
        tls = ssl.create_default_context() if upstream.scheme == "https" else None
        self.pool = pool or UpstreamPool(
            upstream.hostname or "127.0.0.1",
            upstream.port or (443 if tls is not None else 80),
            max_connections=proxy.max_connections,
            connect_timeout_s=self.timeout_s,
            read_timeout_s=self.timeout_s,
            write_timeout_s=self.timeout_s,
            tls=tls,
        )
        self.max_body = proxy.max_body_bytes
        self.identity_header = config.identity.header.lower().encode("latin-1")
        self.trusted = [ipaddress.ip_network(c, strict=False) for c in proxy.trusted_proxies]
        self._trust: dict[str, bool] = {}

    def _trusted(self, peer: str | None) -> bool:
        if not peer or not self.trusted:
            return False
        known = self._trust.get(peer)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            trusted = False
        else:
            trusted = any(address in net for net in self.trusted)
        if len(self._trust) >= 4096:
            self._trust.clear()
        self._trust[peer] = trusted
        return trusted

    def _request_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        client = scope.get("client")
        peer = client[0] if client else ""
        trusted = self._trusted(peer)
        incoming: list[tuple[bytes, bytes]] = scope["headers"]
        named = _connection_named(incoming)
        drop = _HOP_BY_HOP | named if named else _HOP_BY_HOP
        out: list[tuple[bytes, bytes]] = []
        forwarded: dict[bytes, bytes] = {}
        host = b""
        identity = self.identity_header
        for k, v in incoming:
            key = k.lower()
            if key in drop or key == identity or key == b"content-length":
                continue
            if key == b"host":
                host = v
                continue
            if key in SPOOFABLE and not trusted:
                continue
            if key in _FORWARDED:
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

    @staticmethod
    def _target(scope: Scope) -> bytes:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if not raw_path.startswith(b"/"):
            raw_path = b"/" + raw_path
        query: bytes = scope.get("query_string", b"")
        # The origin is fixed: `//evil/x` or `/http://evil` stay paths of the request line.
        return raw_path + b"?" + query if query else raw_path

    async def aclose(self) -> None:
        """Close the idle upstream connections."""
        await self.pool.aclose()

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
        lengths = set()
        chunked = False
        for k, v in scope["headers"]:
            key = k.lower()
            if key == b"content-length":
                lengths.add(v.strip())
            elif key == b"transfer-encoding":
                chunked = True
        if chunked:  # framing is ambiguous only with Transfer-Encoding
            ambiguous = framing_problem(scope.get("http_version", "1.1"), scope["headers"])
            if ambiguous is not None:
                # `metergate serve` refuses these before any app runs; other servers get this.
                await send_answer(send, _closing(problem("bad-request", 400, ambiguous)))
                return
        length: int | None = None
        if lengths:
            value = lengths.pop()
            if lengths or not value.isdigit():
                detail = "the request has an invalid Content-Length"
                await send_answer(send, _closing(problem("bad-request", 400, detail)))
                return
            length = int(value)
            if length > self.max_body:
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
            await self._exchange(scope, receive, send, length, chunked, left)
        finally:
            self.slots.release(who)

    async def _body(self, receive: Receive) -> AsyncIterator[bytes]:
        """The request body as it streams in, within the size limit and the chunk deadline."""
        seen = 0
        while True:
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    message = await receive()
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
                return

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        length: int | None,
        chunked: bool,
        connect_s: float,
    ) -> None:
        """Forward one request and stream the answer back, within `connect_s` to connect."""
        has_body = chunked or bool(length)
        try:
            response = await self.pool.request(
                scope["method"].encode("latin-1"),
                self._target(scope),
                self._request_headers(scope),
                self._body(receive) if has_body else None,
                content_length=length,
                timeout_s=connect_s,
            )
        except BodyTooLarge:
            await send_answer(send, _too_large(self.max_body))
            return
        except BodyTimeout:
            await send_answer(send, _body_timeout(self.body_timeout_s))
            return
        except ClientGone:
            return
        except UpstreamTimeout:
            await send_answer(send, _timed_out())
            return
        except UpstreamError as exc:
            await send_answer(send, problem("bad-gateway", 502, f"the upstream failed ({exc})"))
            return
        watcher = None
        if not response.complete and (response.sent_whole or not has_body):
            # Only a disconnect can arrive now: on one, stop reading the upstream (an LLM server
            # stops generating when its client goes) instead of streaming to nobody.
            watcher = asyncio.ensure_future(_close_on_disconnect(receive, response))
        trailers = response.chunked and "http.response.trailers" in scope.get("extensions", {})
        try:
            start: dict[str, object] = {
                "type": "http.response.start",
                "status": response.status,
                "headers": _strip_hop_by_hop(response.headers, _NOT_RETURNED),
            }
            if trailers:
                start["trailers"] = True
            await send(start)
            # The chunk that completes the body goes out with `more_body: False`: the metering
            # around settles before it leaves, so a client that has read it all finds it settled.
            more = True
            while more:
                data, more = await response.read()
                await send({"type": "http.response.body", "body": data, "more_body": more})
            if trailers:
                await send(
                    {
                        "type": "http.response.trailers",
                        "headers": _strip_hop_by_hop(response.trailers),
                        "more_trailers": False,
                    }
                )
        except (UpstreamError, OSError):
            # The upstream or the client went away mid-body: nothing more can be said on this
            # response; the metering middleware settles in its finally block.
            response.close()
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
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _close_on_disconnect(receive: Receive, response: Response) -> None:
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
    pool: UpstreamPool | None = None,
) -> MeteringMiddleware:
    """Return the metered reverse proxy as an ASGI app."""
    cfg = as_config(config)
    return MeteringMiddleware(ProxyApp(cfg, pool), cfg, meter=meter, clock=clock)
