"""`WSGIMeteringMiddleware`: metering around a WSGI app (Flask, Django) over the blocking core."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import Any

from metergate.bodytap import WsgiResponseTap, read_reserves_wsgi
from metergate.config import GatewayConfig
from metergate.core.errors import StorageUnavailable
from metergate.core.http import Admission, Answer, Deferred, Gate, KeyCache, ratelimit_fields
from metergate.core.model import Decision
from metergate.core.paths import BadPath, bad_request, normalize_decoded
from metergate.meter import ConfigSource, Meter, as_config
from metergate.observability import STORAGE_ERRORS, observe

__all__ = ["WSGIMeteringMiddleware"]

logger = logging.getLogger("metergate")

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
OnEnd = Callable[[Mapping[str, str]], None]

DEGRADED_BUFFER = 100_000
DRAIN_PER_REQUEST = 100
DEGRADED = [("metergate-degraded", "?1")]


def _headers(environ: Environ) -> dict[str, str]:
    out = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
    if "CONTENT_TYPE" in environ:
        out["content-type"] = environ["CONTENT_TYPE"]
    if "CONTENT_LENGTH" in environ:
        out["content-length"] = environ["CONTENT_LENGTH"]
    return out


# Field name -> the environ keys that may hold it, in order. The names asked for come from the
# config (identity, cost and Idempotency-Key fields), so this stays small.
_ENVIRON_KEYS: dict[str, tuple[str, ...]] = {
    "content-type": ("CONTENT_TYPE", "HTTP_CONTENT_TYPE"),
    "content-length": ("CONTENT_LENGTH", "HTTP_CONTENT_LENGTH"),
}


def _environ_keys(name: str) -> tuple[str, ...]:
    keys = _ENVIRON_KEYS.get(name)
    if keys is None:
        # "_" in an environ key stands for "-": a field name with "_" has no environ key.
        keys = () if "_" in name else ("HTTP_" + name.upper().replace("-", "_"),)
        _ENVIRON_KEYS[name] = keys
    return keys


class _Headers(Mapping[str, str]):
    """The request's header fields by lower-case name, read from the environ when asked.

    A request carries a dozen fields and metering reads two or three: looking them up costs
    less than copying them all.
    """

    __slots__ = ("_environ",)

    def __init__(self, environ: Environ) -> None:
        self._environ = environ

    def get(self, name: str, default: Any = None) -> Any:
        environ = self._environ
        for key in _ENVIRON_KEYS.get(name) or _environ_keys(name):
            if key in environ:
                return environ[key]
        return default

    def __getitem__(self, name: str) -> str:
        value = self.get(name, _MISSING)
        if value is _MISSING:
            raise KeyError(name)
        return value  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[str]:
        return iter(_headers(self._environ))

    def __len__(self) -> int:
        return len(_headers(self._environ))


_MISSING = object()


def _path(environ: Environ) -> str:
    """The request path as ASGI sees it: SCRIPT_NAME + PATH_INFO, decoded as UTF-8."""
    raw = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    if raw.isascii():
        return raw or "/"  # the same in latin-1 and in UTF-8
    # PEP 3333 hands the path over as bytes decoded with latin-1; ASGI and the config use UTF-8.
    with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):
        raw = raw.encode("latin-1").decode("utf-8")
    return raw or "/"


def _answer(start_response: StartResponse, answer: Answer) -> list[bytes]:
    start_response(f"{answer.status} {HTTPStatus(answer.status).phrase}", answer.headers)
    return [answer.body]


class _Metered:
    """The app's response body, passed through untouched, calling `end` once when it is over.

    `end` runs before the last bytes are handed to the server when the response has a
    Content-Length (so a client that has read it all finds it settled), otherwise as soon as the
    body is exhausted, and in any case when the server closes the body (errors, disconnects).
    """

    def __init__(
        self,
        body: Iterable[bytes],
        headers: Mapping[str, str],
        end: Callable[[], None],
        tap: WsgiResponseTap | None = None,
    ) -> None:
        self._body = body
        self._headers = headers
        self._end = end
        self._tap = tap

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        tap = self._tap
        for chunk in self._body:
            if tap is not None:
                tap.feed(chunk)  # scanned as it passes; never held back
            # Read per chunk: a generator app calls start_response only when it first runs.
            length = self._headers.get("content-length", "")
            sent += len(chunk)
            if length.isdigit() and sent >= int(length):
                if tap is not None:
                    tap.finish()
                self._end()
            yield chunk
        if tap is not None:
            tap.finish()
        self._end()

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._end()


class WSGIMeteringMiddleware:
    """Meter every routed request of a WSGI app: admit, answer refusals, settle at the end.

    `identify(environ)` replaces the API-key lookup and returns the customer id;
    `costs={metric: f}` replaces a route's cost of `metric` with `f(environ)`, an int.
    """

    def __init__(
        self,
        app: WSGIApp,
        config: ConfigSource,
        *,
        meter: Meter | None = None,
        identify: Callable[[Environ], str | None] | None = None,
        costs: Mapping[str, Callable[[Environ], int]] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.app = app
        self.config: GatewayConfig = as_config(config)
        self.clock = clock or time.time
        self.meter = meter or Meter(self.config, clock=self.clock)
        self.gate = Gate(self.config, costs=costs)
        self.identify = identify
        self._keys = KeyCache(self.meter.core.revocations)
        # Requests let through while storage was down (`on_failure: open`), recorded when it is
        # back.
        self._deferred: deque[Deferred] = deque(maxlen=DEGRADED_BUFFER)
        self._draining = threading.Lock()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        try:
            path = normalize_decoded(_path(environ))
        except BadPath as exc:
            return _answer(start_response, bad_request(exc))
        route = self.gate.routes.match(method, path)
        if route is None:
            answer = self.gate.unmatched()
            if answer is None:
                return self.app(environ, start_response)
            return _answer(start_response, answer)
        if not route.costs:
            return self.app(environ, start_response)

        headers = _Headers(environ)
        key = None if self.identify is not None else self.gate.key_of(headers)
        try:
            customer = self._customer(environ, key)
        except StorageUnavailable:
            # Nobody could be looked up: in `open` mode the request passes, billed to its key later.
            planned = self.gate.admission("", route, headers, environ)
            if isinstance(planned, Answer):
                return _answer(start_response, planned)
            return self._storage_failed(environ, start_response, planned, key)
        if customer is None:
            refusal = Decision(
                False, 401, "unauthenticated", "", detail="no API key, or a key nobody holds"
            )
            return _answer(start_response, self.gate.refusal(refusal, self.clock()))
        reserves = None
        if route.request_reserves:
            reserves = read_reserves_wsgi(environ, route, headers)
        planned = self.gate.admission(customer, route, headers, environ, reserves)
        if isinstance(planned, Answer):
            return _answer(start_response, planned)
        started = time.perf_counter()
        try:
            decision = self._admit(planned)
        except StorageUnavailable:
            STORAGE_ERRORS.inc()
            return self._storage_failed(environ, start_response, planned, None)
        observe(decision, time.perf_counter() - started)
        if not decision.allowed:
            return _answer(start_response, self.gate.refusal(decision, self.clock()))
        if self._deferred:
            self._drain(DRAIN_PER_REQUEST)

        ticket = decision.ticket
        fields = ratelimit_fields(decision, self.clock())
        if ticket is None:
            # Nothing to settle when the response is over: the body is the app's own.
            def start_with_fields(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
                return start_response(status, [*headers, *fields], *args)

            return self.app(environ, start_with_fields)

        response_headers: dict[str, str] = {}
        tap = WsgiResponseTap(route, response_headers) if route.body_costs else None

        def settle(response_headers: Mapping[str, str]) -> None:
            # After a disconnect, what the body reported so far (a complete event), else the
            # reserve.
            found = tap.found() if tap is not None else None
            try:
                self.meter.settle(ticket, self.gate.actuals(planned, response_headers, found))
            except Exception:  # the hold or lease expires on its own; never fail the response
                logger.exception("metergate: settlement failed; the hold will expire")

        return self._forward(environ, start_response, fields, settle, response_headers, tap)

    def _admit(self, planned: Admission) -> Decision:
        route = planned.route
        return self.meter.admit(
            planned.customer,
            planned.amounts,
            planned.idempotency_key,
            estimates=planned.estimates,
            hold_ttl_s=max(1, route.reserve_ttl_ms // 1000),
            lease_ttl_s=max(1, route.lease_ttl_ms // 1000) if route.lease_ttl_ms else None,
        )

    def _customer(self, environ: Environ, key: str | None) -> str | None:
        if self.identify is not None:
            return self.identify(environ)
        if key is None:
            return None
        now = time.monotonic()
        cached = self._keys.get(key, now)
        if cached is not None:
            return cached
        customer = self.meter.customer_for_key(key)
        if customer is not None:
            self._keys.put(key, customer, now)
        return customer

    def _forward(
        self,
        environ: Environ,
        start_response: StartResponse,
        fields: list[tuple[str, str]],
        on_end: OnEnd,
        response_headers: dict[str, str] | None = None,
        tap: WsgiResponseTap | None = None,
    ) -> Iterable[bytes]:
        """Run the app with our fields added; `on_end` runs once, however the response ends.

        `response_headers` is filled with the response's fields (lowercased) for `tap` to read.
        """
        response_headers = {} if response_headers is None else response_headers
        ended = threading.Lock()

        def end() -> None:
            if ended.acquire(blocking=False):
                on_end(response_headers)

        def metered_start_response(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            # The app's own headers stay untouched; ours are appended.
            for k, v in headers:
                response_headers[k.lower()] = v
            return start_response(status, [*headers, *fields], *args)

        try:
            body = self.app(environ, metered_start_response)
        except BaseException:
            end()
            raise
        return _Metered(body, response_headers, end, tap)

    def _storage_failed(
        self,
        environ: Environ,
        start_response: StartResponse,
        planned: Admission,
        api_key: str | None,
    ) -> Iterable[bytes]:
        if self.config.storage.on_failure == "closed":
            return _answer(start_response, self.gate.unavailable())
        # The same Idempotency-Key retried while storage is down is still recorded once.
        key = planned.idempotency_key
        operation = f"degraded:{key}" if key else f"degraded-{uuid.uuid4().hex}"
        response_headers: dict[str, str] = {}
        route = planned.route
        tap = WsgiResponseTap(route, response_headers) if route.body_costs else None

        def defer(response_headers: Mapping[str, str]) -> None:
            found = tap.found() if tap is not None else None
            item = self.gate.deferred(planned, response_headers, operation, api_key, found)
            if item is None:
                return
            if len(self._deferred) == self._deferred.maxlen:
                logger.error(
                    "metergate: degraded buffer full; the oldest unmetered request is dropped"
                )
            self._deferred.append(item)

        return self._forward(environ, start_response, DEGRADED, defer, response_headers, tap)

    def _drain(self, limit: int) -> None:
        """Record up to `limit` requests let through while storage was down (one thread at once)."""
        if not self._draining.acquire(blocking=False):
            return
        try:
            for _ in range(limit):
                if not self._deferred:
                    return
                item = self._deferred[0]
                try:
                    customer = item.customer
                    if customer is None and item.api_key is not None:
                        customer = self.meter.customer_for_key(item.api_key)
                    if customer is not None:
                        decision = self.meter.admit(customer, item.amounts, item.operation)
                        if not decision.allowed:
                            logger.warning(
                                "metergate: a request let through while storage was down was "
                                "refused afterwards (%s); it stays unrecorded",
                                decision.problem,
                            )
                except StorageUnavailable:
                    return  # still down: a later admitted request tries again
                except Exception:
                    logger.exception("metergate: could not record a request let through while down")
                self._deferred.popleft()
        finally:
            self._draining.release()
