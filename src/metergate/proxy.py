"""The standalone reverse proxy: an ASGI app forwarding to `proxy.upstream`, metered.

Bodies stream in both directions without being buffered whole. Hop-by-hop fields (RFC 9110 7.6.1)
and the customer's API key never cross; `X-Forwarded-*` are trusted only from `trusted_proxies`;
the upstream origin is fixed at start and no request path can change it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Callable

import httpx

from metergate.asgi import MeteringMiddleware, Receive, Scope, Send
from metergate.config import GatewayConfig
from metergate.core.http import Answer, problem
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
    """Send a complete answer (status, headers, body) on an ASGI connection."""
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
    await send({"type": "http.response.start", "status": answer.status, "headers": raw})
    await send({"type": "http.response.body", "body": answer.body})


class BodyTooLarge(Exception):
    """The request body passed `proxy.max_body_bytes` while streaming."""


def _strip_hop_by_hop(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    named = set(HOP_BY_HOP)
    for k, v in headers:
        if k.lower() == b"connection":
            named |= {t.strip().lower() for t in v.decode("latin-1").split(",") if t.strip()}
    return [(k, v) for k, v in headers if k.decode("latin-1").lower() not in named]


class ProxyApp:
    """Forward each request to the upstream and stream the response back."""

    def __init__(self, config: GatewayConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        proxy = config.proxy
        self.upstream = httpx.URL(proxy.upstream)
        self.max_body = proxy.max_body_bytes
        self.identity_header = config.identity.header.lower().encode("latin-1")
        self.trusted = [ipaddress.ip_network(c, strict=False) for c in proxy.trusted_proxies]
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(proxy.timeout_s),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
            follow_redirects=False,
        )

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

    def _url(self, scope: Scope) -> httpx.URL:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if not raw_path.startswith(b"/"):
            raw_path = b"/" + raw_path
        query: bytes = scope.get("query_string", b"")
        # copy_with(raw_path=...) keeps scheme, host and port: `//evil/x` stays a path here.
        return self.upstream.copy_with(raw_path=raw_path + (b"?" + query if query else b""))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = dict((k.lower(), v) for k, v in scope["headers"])
        if b"transfer-encoding" in headers and b"content-length" in headers:
            await send_answer(
                send, problem("invalid-request", 400, "both Transfer-Encoding and Content-Length")
            )
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await send_answer(send, _too_large(self.max_body))
            return

        async def body() -> AsyncIterator[bytes]:
            seen = 0
            while True:
                message = await receive()
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

        request = self.client.build_request(
            scope["method"],
            self._url(scope),
            headers=self._request_headers(scope),
            content=body() if scope["method"] not in ("GET", "HEAD") or length else None,
        )
        try:
            response = await self.client.send(request, stream=True)
        except BodyTooLarge:
            await send_answer(send, _too_large(self.max_body))
            return
        except ClientGone:
            return
        except httpx.TimeoutException:
            await send_answer(
                send, problem("gateway-timeout", 504, "the upstream did not answer in time")
            )
            return
        except httpx.HTTPError as exc:
            detail = f"the upstream is unreachable ({type(exc).__name__})"
            await send_answer(send, problem("bad-gateway", 502, detail))
            return
        try:
            out_headers = _strip_hop_by_hop(list(response.headers.raw))
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": out_headers,
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (httpx.HTTPError, OSError):
            # The upstream or the client went away mid-body: nothing more can be said on this
            # response; the metering middleware settles in its finally block.
            pass
        finally:
            await response.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


class ClientGone(Exception):
    """The client disconnected while its request body was being forwarded."""


def _too_large(limit: int) -> Answer:
    return problem("body-too-large", 413, f"the request body exceeds {limit} bytes")


def create_app(
    config: ConfigSource,
    *,
    meter: AsyncMeter | None = None,
    clock: Callable[[], float] | None = None,
    client: httpx.AsyncClient | None = None,
) -> MeteringMiddleware:
    """Return the metered reverse proxy as an ASGI app."""
    cfg = as_config(config)
    return MeteringMiddleware(ProxyApp(cfg, client), cfg, meter=meter, clock=clock)
