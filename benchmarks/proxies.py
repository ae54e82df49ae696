"""The reverse proxy with each candidate upstream client, as small ASGI apps to compare.

Each app subclasses metergate's `ProxyApp`, so the request-side work (hop-by-hop removal, the API
key and `X-Forwarded-*` policy, the size limit, the fixed origin) is the shipped code; only the
upstream exchange differs. All of them send the last body chunk with `more_body: False` instead of
an empty extra message (one ASGI send less per small response); the shipped app is measured as is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpcore
import httpx
from leanhttp import LeanPool, UpstreamError, UpstreamTimeout

from metergate.asgi import Receive, Scope, Send
from metergate.config import GatewayConfig
from metergate.core.http import problem
from metergate.proxy import ProxyApp, _strip_hop_by_hop, _too_large, send_answer

__all__ = ["AiohttpProxy", "HttpcoreProxy", "HttpxClientProxy", "HttpxTransportProxy", "LeanProxy"]

MAX_CONNECTIONS = 1000
KEEPALIVE = 256


class _Refused(Exception):
    def __init__(self, answer: Any) -> None:
        self.answer = answer


async def relay(send: Send, chunks: AsyncIterator[bytes]) -> None:
    """Send a streamed body, holding one chunk back so the last goes out with more_body False."""
    held: bytes | None = None
    async for chunk in chunks:
        if not chunk:
            continue
        if held is not None:
            await send({"type": "http.response.body", "body": held, "more_body": True})
        held = chunk
    await send({"type": "http.response.body", "body": held or b"", "more_body": False})


class _CandidateProxy(ProxyApp):
    """The shipped proxy's request handling; subclasses implement `exchange` with their client."""

    def __init__(self, config: GatewayConfig) -> None:
        super().__init__(config)
        # the candidates want a URL; the shipped proxy keeps a pool to host and port
        self.upstream = httpx.URL(config.proxy.upstream)
        self.host = self.upstream.host
        self.port = self.upstream.port or 80
        self.origin = f"{self.upstream.scheme}://{self.host}:{self.port}"
        self.timeout_s = float(config.proxy.timeout_s)

    def target(self, scope: Scope) -> bytes:
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        if not raw.startswith(b"/"):
            raw = b"/" + raw
        query: bytes = scope.get("query_string", b"")
        return raw + b"?" + query if query else raw

    def body(self, scope: Scope, receive: Receive) -> AsyncIterator[bytes] | None:
        length = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if scope["method"] in ("GET", "HEAD") and not length:
            return None
        return self._stream(receive)

    async def _stream(self, receive: Receive) -> AsyncIterator[bytes]:
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Refused(None)
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_body:
                raise _Refused(_too_large(self.max_body))
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        names = {k.lower(): v for k, v in scope["headers"]}
        if b"transfer-encoding" in names and b"content-length" in names:
            detail = "both Transfer-Encoding and Content-Length"
            await send_answer(send, problem("invalid-request", 400, detail))
            return
        length = names.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await send_answer(send, _too_large(self.max_body))
            return
        try:
            await self.exchange(scope, receive, send, self._request_headers(scope))
        except _Refused as refused:
            if refused.answer is not None:
                await send_answer(send, refused.answer)
        except TimeoutError:
            detail = "the upstream did not answer in time"
            await send_answer(send, problem("gateway-timeout", 504, detail))
        except OSError as exc:
            detail = f"the upstream is unreachable ({type(exc).__name__})"
            await send_answer(send, problem("bad-gateway", 502, detail))

    async def exchange(
        self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]
    ) -> None:
        raise NotImplementedError

    async def start(self, send: Send, status: int, raw: list[tuple[bytes, bytes]]) -> None:
        headers = _strip_hop_by_hop(raw)
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            await client.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


class HttpxClientProxy(_CandidateProxy):
    """httpx.AsyncClient tuned: no env lookups, a big keep-alive pool, Requests built directly."""

    def __init__(self, config: GatewayConfig) -> None:
        super().__init__(config)
        self.tuned = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(
                max_connections=MAX_CONNECTIONS, max_keepalive_connections=KEEPALIVE
            ),
            follow_redirects=False,
            trust_env=False,
        )

    async def exchange(
        self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]
    ) -> None:
        request = httpx.Request(
            scope["method"],
            self.upstream.copy_with(raw_path=self.target(scope)),
            headers=headers,
            content=self.body(scope, receive),
            extensions={"timeout": self.tuned.timeout.as_dict()},
        )
        try:
            response = await self.tuned.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise TimeoutError from exc
        except httpx.HTTPError as exc:
            raise OSError(str(exc)) from exc
        try:
            await self.start(send, response.status_code, response.headers.raw)
            await relay(send, response.aiter_raw())
        except (httpx.HTTPError, OSError):
            pass
        finally:
            await response.aclose()

    async def close(self) -> None:
        await self.tuned.aclose()
        await super().close()


class HttpxTransportProxy(_CandidateProxy):
    """httpx without the Client layer: AsyncHTTPTransport (no auth, redirects or cookie jar)."""

    def __init__(self, config: GatewayConfig) -> None:
        super().__init__(config)
        self.transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(
                max_connections=MAX_CONNECTIONS, max_keepalive_connections=KEEPALIVE
            ),
            trust_env=False,
        )
        self.timeouts = httpx.Timeout(self.timeout_s).as_dict()

    async def exchange(
        self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]
    ) -> None:
        request = httpx.Request(
            scope["method"],
            self.upstream.copy_with(raw_path=self.target(scope)),
            headers=headers,
            content=self.body(scope, receive),
            extensions={"timeout": self.timeouts},
        )
        try:
            response = await self.transport.handle_async_request(request)
        except httpx.TimeoutException as exc:
            raise TimeoutError from exc
        except httpx.HTTPError as exc:
            raise OSError(str(exc)) from exc
        try:
            await self.start(send, response.status_code, response.headers.raw)
            await relay(send, response.stream)  # type: ignore[arg-type]
        except (httpx.HTTPError, OSError):
            pass
        finally:
            await response.aclose()

    async def close(self) -> None:
        await self.transport.aclose()
        await super().close()


class HttpcoreProxy(_CandidateProxy):
    """httpcore's AsyncConnectionPool directly: the engine under httpx, without its models."""

    def __init__(self, config: GatewayConfig) -> None:
        super().__init__(config)
        self.pool = httpcore.AsyncConnectionPool(
            max_connections=MAX_CONNECTIONS, max_keepalive_connections=KEEPALIVE
        )
        self.timeouts = httpx.Timeout(self.timeout_s).as_dict()
        self.scheme = self.upstream.scheme.encode()
        self.host_b = self.host.encode()

    async def exchange(
        self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]
    ) -> None:
        body = self.body(scope, receive)
        host = b"%s:%d" % (self.host_b, self.port)
        request = httpcore.Request(
            scope["method"].encode(),
            httpcore.URL(
                scheme=self.scheme, host=self.host_b, port=self.port, target=self.target(scope)
            ),
            headers=[(b"host", host), *headers]
            + ([(b"transfer-encoding", b"chunked")] if body is not None else []),
            content=body,
            extensions={"timeout": self.timeouts},
        )
        try:
            response = await self.pool.handle_async_request(request)
        except httpcore.TimeoutException as exc:
            raise TimeoutError from exc
        except httpcore.NetworkError as exc:
            raise OSError(str(exc)) from exc
        try:
            await self.start(send, response.status, response.headers)
            await relay(send, response.stream)  # type: ignore[arg-type]
        except (httpcore.NetworkError, OSError):
            pass
        finally:
            await response.aclose()

    async def close(self) -> None:
        await self.pool.aclose()
        await super().close()


class AiohttpProxy(_CandidateProxy):
    """aiohttp's ClientSession: a dummy cookie jar, no auto headers or decompression."""

    def __init__(self, config: GatewayConfig) -> None:
        super().__init__(config)
        self.session: Any = None

    def _session(self) -> Any:
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=MAX_CONNECTIONS, limit_per_host=MAX_CONNECTIONS, keepalive_timeout=60
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=self.timeout_s),
            )
        return self.session

    async def exchange(
        self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]
    ) -> None:
        import aiohttp
        import yarl

        session = self._session()
        url = yarl.URL(self.origin + self.target(scope).decode("latin-1"), encoded=True)
        try:
            response = await session.request(
                scope["method"],
                url,
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                data=self.body(scope, receive),
                allow_redirects=False,
            )
        except TimeoutError:
            raise
        except aiohttp.ClientError as exc:
            raise OSError(str(exc)) from exc
        try:
            await self.start(send, response.status, list(response.raw_headers))
            await relay(send, response.content.iter_any())
        except (aiohttp.ClientError, OSError):
            pass
        finally:
            response.release()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        await super().close()


class LeanProxy(_CandidateProxy):
    """The lean pooled HTTP/1.1 client of leanhttp.py."""

    def __init__(self, config: GatewayConfig) -> None:
        super().__init__(config)
        self.pool = LeanPool(self.host, self.port, read_timeout_s=self.timeout_s)

    async def exchange(
        self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]
    ) -> None:
        try:
            response = await self.pool.request(
                scope["method"].encode(), self.target(scope), headers, self.body(scope, receive)
            )
        except UpstreamTimeout as exc:
            raise TimeoutError from exc
        except UpstreamError as exc:
            raise OSError(str(exc)) from exc
        try:
            await self.start(send, response.status, response.headers)
            more = True
            while more:
                data, more = await response.read(self.timeout_s)
                await send({"type": "http.response.body", "body": data, "more_body": more})
        except (UpstreamError, OSError):
            response.close()
            return
        except BaseException:
            response.close()
            raise
        self.pool.release(response)
