"""`WSGIMeteringMiddleware`: metering around a WSGI app (Flask, Django) over the blocking core."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from metergate.config import GatewayConfig
from metergate.core.errors import StorageUnavailable
from metergate.core.http import Admission, Answer, Gate, ratelimit_fields
from metergate.core.model import Decision
from metergate.meter import ConfigSource, Meter, as_config

__all__ = ["WSGIMeteringMiddleware"]

logger = logging.getLogger("metergate")

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

KEY_CACHE_S = 5.0
DEGRADED_BUFFER = 100_000


def _headers(environ: Environ) -> dict[str, str]:
    out = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
    if "CONTENT_TYPE" in environ:
        out["content-type"] = environ["CONTENT_TYPE"]
    if "CONTENT_LENGTH" in environ:
        out["content-length"] = environ["CONTENT_LENGTH"]
    return out


def _status_line(status: int) -> str:
    from http import HTTPStatus

    return f"{status} {HTTPStatus(status).phrase}"


def _answer(start_response: StartResponse, answer: Answer) -> list[bytes]:
    start_response(_status_line(answer.status), answer.headers)
    return [answer.body]


class _Settling:
    """The app's response body, settling the admission once it is exhausted or closed."""

    def __init__(self, body: Iterable[bytes], settle: Callable[[], None]) -> None:
        self._body = body
        self._settle = settle

    def __iter__(self) -> Iterator[bytes]:
        yield from self._body

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._settle()


class WSGIMeteringMiddleware:
    """Meter every routed request of a WSGI app: admit, answer refusals, settle at the end."""

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
        self._keys: dict[str, tuple[str, float]] = {}
        self._degraded: deque[Admission] = deque(maxlen=DEGRADED_BUFFER)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/") or "/"
        route = self.gate.routes.match(method, path)
        if route is None:
            answer = self.gate.unmatched()
            if answer is None:
                return self.app(environ, start_response)
            return _answer(start_response, answer)
        if not route.costs:
            return self.app(environ, start_response)

        headers = _headers(environ)
        try:
            customer = self._customer(environ, headers)
        except StorageUnavailable:
            return _answer(start_response, self.gate.unavailable())
        if customer is None:
            refusal = Decision(
                False, 401, "unauthenticated", "", detail="no API key, or a key nobody holds"
            )
            return _answer(start_response, self.gate.refusal(refusal, self.clock()))
        planned = self.gate.admission(customer, route, headers, environ)
        if isinstance(planned, Answer):
            return _answer(start_response, planned)
        try:
            decision = self._admit(planned)
        except StorageUnavailable:
            if self.config.storage.on_failure == "closed":
                return _answer(start_response, self.gate.unavailable())
            planned.idempotency_key = planned.idempotency_key or "degraded-" + uuid.uuid4().hex
            self._degraded.append(planned)
            decision = Decision(True, 200, None, planned.customer, degraded=True)
            degraded = [("metergate-degraded", "?1")]
            return self._forward(environ, start_response, planned, decision, degraded)
        if not decision.allowed:
            return _answer(start_response, self.gate.refusal(decision, self.clock()))
        if self._degraded:
            self._drain()
        return self._forward(environ, start_response, planned, decision)

    def _admit(self, planned: Admission) -> Decision:
        route = planned.route
        return self.meter.admit(
            planned.customer,
            planned.amounts,
            planned.idempotency_key,
            estimates=planned.estimates,
            hold_ttl_s=max(1, route.reserve_ttl_ms // 1000),
            lease_ttl_s=route.lease_ttl_ms // 1000 if route.lease_ttl_ms else None,
        )

    def _customer(self, environ: Environ, headers: dict[str, str]) -> str | None:
        if self.identify is not None:
            return self.identify(environ)
        key = self.gate.key_of(headers)
        if key is None:
            return None
        now = time.monotonic()
        cached = self._keys.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        customer = self.meter.customer_for_key(key)
        if customer is not None:
            if len(self._keys) > 100_000:
                self._keys.clear()
            self._keys[key] = (customer, now + KEY_CACHE_S)
        return customer

    def _forward(
        self,
        environ: Environ,
        start_response: StartResponse,
        planned: Admission,
        decision: Decision,
        extra: list[tuple[str, str]] | None = None,
    ) -> Iterable[bytes]:
        fields = extra if extra is not None else ratelimit_fields(decision, self.clock())
        response_headers: dict[str, str] = {}
        ticket = decision.ticket
        settled = threading.Event()

        def settle() -> None:
            if ticket is None or settled.is_set():
                return
            settled.set()
            try:
                self.meter.settle(ticket, self.gate.actuals(planned, response_headers))
            except Exception:  # the hold or lease expires on its own; never fail the response
                logger.exception("metergate: settlement failed; the hold will expire")

        def metered_start_response(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            for k, v in headers:
                response_headers[k.lower()] = v
            return start_response(status, [*headers, *fields], *args)

        try:
            body = self.app(environ, metered_start_response)
        except BaseException:
            settle()
            raise
        return _Settling(body, settle)

    def _drain(self) -> None:
        """Meter what was let through while storage was down, once each (same idempotency key)."""
        while self._degraded:
            planned = self._degraded[0]
            try:
                decision = self.meter.admit(
                    planned.customer,
                    {**planned.amounts, **planned.estimates},
                    planned.idempotency_key,
                )
            except StorageUnavailable:
                return
            self._degraded.popleft()
            if decision.ticket is not None:
                self.meter.settle(decision.ticket)
