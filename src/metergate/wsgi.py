"""`WSGIMeteringMiddleware`: metering around a WSGI app (Flask, Django) over the blocking core."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import Any

from metergate.bodytap import WsgiResponseTap, read_reserves_wsgi
from metergate.config import GatewayConfig
from metergate.core import idempotency
from metergate.core import request as steps
from metergate.core.errors import StorageUnavailable
from metergate.core.http import (
    Admission,
    Answer,
    Gate,
    KeyCache,
    problem,
    too_large,
)
from metergate.core.model import Decision
from metergate.core.paths import BadPath, bad_request, normalize_decoded
from metergate.meter import ConfigSource, Meter, as_config
from metergate.observability import STORAGE_ERRORS
from metergate.recovery import ThreadRecovery

__all__ = ["WSGIMeteringMiddleware"]

logger = logging.getLogger("metergate")

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
OnEnd = Callable[[Mapping[str, str], bool], None]

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
        # Refunds of admissions whose reply was lost, and requests let through while storage was
        # down (`on_failure: open`): a background thread runs them as soon as storage answers.
        self.recovery = ThreadRecovery(self.meter)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        try:
            path = normalize_decoded(_path(environ))
        except BadPath as exc:
            return _answer(start_response, bad_request(exc))
        headers = _Headers(environ)
        flow = steps.request_flow(
            self.gate,
            self.meter.book,
            self.meter.core.new_attempt,
            self.clock,
            time.monotonic,
            method,
            path,
            headers,
            environ,
            keyless=self.identify is not None,
            known=self._known,
        )
        return self._act(self._drive(flow, environ, headers), environ, start_response, [])

    def _drive(
        self, flow: steps.Flow, environ: Environ, headers: Mapping[str, str]
    ) -> steps.Verdict:
        """Run a request flow to its verdict, doing the I/O it asks for."""
        reply: Any = None
        failed: StorageUnavailable | None = None
        while True:
            try:
                need = flow.send(reply) if failed is None else flow.throw(failed)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            reply, failed = None, None
            try:
                if isinstance(need, steps.Admit):
                    reply = self._admit(need.planned, need.attempt, "")
                elif isinstance(need, steps.Identify):
                    reply = self._customer(environ, need.key)
                else:
                    reply = read_reserves_wsgi(environ, need.route, headers)
            except StorageUnavailable as exc:
                failed = exc

    def _act(
        self,
        verdict: steps.Verdict,
        environ: Environ,
        start_response: StartResponse,
        outcome: list[str],
    ) -> Iterable[bytes]:
        """Do what a flow decided; `outcome` gets `refused`, `unavailable`, `refunded` or
        `served` (the last two when the response ends)."""
        if isinstance(verdict, steps.Local):
            outcome.append("served")
            return self._serve_local(environ, start_response, verdict)
        if isinstance(verdict, steps.Forward):
            return self._serve(environ, start_response, verdict, outcome)
        if isinstance(verdict, steps.PassThrough):
            outcome.append("served")
            return self.app(environ, start_response)
        if isinstance(verdict, steps.Respond):
            outcome.append("refused")
            return _answer(start_response, verdict.answer)
        if isinstance(verdict, steps.Keyed):
            return self._keyed(environ, start_response, verdict.planned)
        if isinstance(verdict, steps.Degraded):
            outcome.append("unavailable")
            return self._storage_failed(
                environ, start_response, verdict.planned, verdict.api_key, verdict.attempt
            )
        outcome.append("refused")
        return []  # Gone: the client left while sending its body

    def _serve(
        self,
        environ: Environ,
        start_response: StartResponse,
        verdict: steps.Forward,
        outcome: list[str],
    ) -> Iterable[bytes]:
        """Forward an admitted request; settle or refund its admission when the response ends
        (`outcome` then gets `refunded` or `served`)."""
        planned, decision, fields = verdict.planned, verdict.decision, verdict.fields
        route = planned.route
        ticket = decision.ticket
        if ticket is None or not (ticket.estimated or ticket.leased or route.refund_on):
            # Nothing to settle or refund when the response is over: the body is the app's own.
            outcome.append("served")
            if ticket is not None and ticket.allowance is not None:
                self.meter.settle(ticket)  # given in process: served, as nothing refunds it

            def start_with_fields(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
                return start_response(status, [*headers, *fields], *args)

            return self.app(environ, start_with_fields)

        response_headers: dict[str, str] = {}
        tap = WsgiResponseTap(route, response_headers) if route.body_costs else None

        def settle(response_headers: Mapping[str, str], refunded: bool) -> None:
            outcome.append("refunded" if refunded else "served")
            if refunded:
                # the customer did not get what it paid for: undo the admission, holds too
                if ticket.allowance is not None:  # given in process: it goes back unused
                    self.meter.refund_ticket(ticket)
                else:
                    self._refund(ticket.customer, ticket.attempt, ticket.operation)
                return
            if ticket.allowance is not None:
                self.meter.settle(ticket)
                return
            if not ticket.estimated and not ticket.leased:
                return
            # After a disconnect, what the body reported so far (a complete event), else the
            # reserve.
            found = tap.found() if tap is not None else None
            try:
                self.meter.settle(ticket, self.gate.actuals(planned, response_headers, found))
            except Exception:  # the hold or lease expires on its own; never fail the response
                logger.exception("metergate: settlement failed; the hold will expire")

        return self._forward(
            environ, start_response, fields, settle, response_headers, tap, route.refund_on
        )

    def _whole_body(self, environ: Environ) -> bytes | None:
        """Read a request's body whole, up to `proxy.max_body_bytes`, and leave it in
        `wsgi.input` for the app; None when it is larger."""
        limit = self.config.proxy.max_body_bytes
        stream = environ.get("wsgi.input")
        length = str(environ.get("CONTENT_LENGTH") or "")
        if length.isdigit() and int(length) > limit:
            return None
        if stream is None:
            data = b""
        elif length.isdigit():
            data = stream.read(int(length))
        elif environ.get("wsgi.input_terminated"):
            data = stream.read(limit + 1)
        else:
            data = b""
        if len(data) > limit:
            return None
        environ["wsgi.input"] = io.BytesIO(data)
        environ["CONTENT_LENGTH"] = str(len(data))
        return data

    def _serve_local(
        self, environ: Environ, start_response: StartResponse, verdict: steps.Local
    ) -> Iterable[bytes]:
        """Serve a request given from a local allowance, with the fields storage would give,
        and give it back to the allowance if it is refunded."""
        book, allowance = self.meter.book, verdict.allowance
        fields = allowance.fields(verdict.left, verdict.now_s)
        assert book is not None
        if not verdict.refund_on:
            book.release(allowance, False)  # nothing can refund it: it is served

            def start_with_fields(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
                return start_response(status, [*headers, *fields], *args)

            return self.app(environ, start_with_fields)

        def settle(_headers: Mapping[str, str], refunded: bool) -> None:
            book.release(allowance, refunded)

        return self._forward(environ, start_response, fields, settle, {}, None, verdict.refund_on)

    def _keyed(
        self, environ: Environ, start_response: StartResponse, planned: Admission
    ) -> Iterable[bytes]:
        """Serve a request carrying Idempotency-Key once (see core.idempotency): replay a
        completed one, refuse a conflict or a duplicate in flight, store what may be replayed."""
        key = str(planned.idempotency_key)
        data = self._whole_body(environ)
        if data is None:
            return _answer(start_response, too_large(self.config.proxy.max_body_bytes))
        fp = idempotency.fingerprint(
            environ.get("REQUEST_METHOD", "GET"),
            # the path the route matched (as under ASGI): a retry spelling it otherwise is the same
            normalize_decoded(_path(environ)),
            environ.get("QUERY_STRING", ""),
            {**planned.amounts, **planned.estimates},
            hashlib.sha256(data).hexdigest(),
        )
        keys, customer = self.meter.core.keys, planned.customer
        in_flight_ms = self.config.proxy.timeout_s * 1000 + 60_000
        try:
            claim = self.meter.run(idempotency.claim(keys, customer, key, fp, in_flight_ms))
        except StorageUnavailable:
            STORAGE_ERRORS.inc()
            return _answer(start_response, self.gate.unavailable())
        if claim.outcome == "replay" and claim.stored is not None:
            stored = claim.stored
            headers = [
                *stored.headers,
                ("content-length", str(len(stored.body))),
                ("idempotent-replayed", "true"),
            ]
            return _answer(start_response, Answer(stored.status, headers, stored.body))
        if claim.outcome != "proceed":
            retry = [("retry-after", "1")] if claim.outcome == "idempotency-in-flight" else []
            detail = (
                "a request with this Idempotency-Key is still in flight"
                if retry
                else "this Idempotency-Key was used with a different request"
            )
            return _answer(start_response, problem(claim.outcome, 409, detail, retry))

        max_bytes = self.config.idempotency.max_response_bytes
        captured: dict[str, Any] = {
            "status": 0,
            "headers": [],
            "body": bytearray(),
            "over": False,
            "whole": False,  # the app's body was read to its end: a stream cut short is not kept
        }

        def capture_start(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            code = status[:3]
            captured["status"] = int(code) if code.isdigit() else 500
            captured["headers"] = list(headers)
            return start_response(status, headers, *args)

        outcome: list[str] = []

        def finish() -> None:
            try:
                if (
                    outcome[:1] == ["served"]
                    and not captured["over"]
                    and captured["status"]
                    and captured["whole"]
                ):
                    flow = idempotency.complete(
                        keys,
                        customer,
                        key,
                        fp,
                        captured["status"],
                        captured["headers"],
                        bytes(captured["body"]),
                        self.config.idempotency.ttl,
                    )
                else:
                    # refused, refunded, unavailable, cut short or too large: a retry is new
                    flow = idempotency.release(keys, customer, key)
                self.meter.run(flow)
            except Exception:
                logger.exception("metergate: could not record the outcome of Idempotency-Key")

        try:
            admission = steps.admission_flow(
                self.gate, planned, self.meter.core.new_attempt(), self.clock, time.monotonic
            )
            verdict = self._drive(admission, environ, {})
            result = self._act(verdict, environ, capture_start, outcome)
        except BaseException:
            finish()
            raise

        def body() -> Iterator[bytes]:
            try:
                for chunk in result:
                    if not captured["over"]:
                        captured["body"] += chunk
                        if len(captured["body"]) > max_bytes:
                            captured["over"], captured["body"] = True, bytearray()
                    yield chunk
                captured["whole"] = True
            finally:
                close = getattr(result, "close", None)
                try:
                    if close is not None:
                        close()
                finally:
                    finish()

        return body()

    def _refund(self, customer: str, attempt: str, operation: str) -> None:
        try:
            self.meter.refund(customer, attempt, operation)
        except StorageUnavailable:
            self.recovery.refund(customer, attempt, operation)
        except Exception:
            logger.exception("metergate: refund of %s failed", attempt)

    def _admit(self, planned: Admission, attempt: str, operation: str) -> Decision:
        route = planned.route
        if not planned.estimates and not operation and not planned.idempotency_key:
            # fixed amounts, no Idempotency-Key: from this process's allowance when allowances are on
            return self.meter.admit_request(
                planned.customer,
                planned.amounts,
                attempt=attempt,
                hold_ttl_ms=route.reserve_ttl_ms,
                lease_ttl_ms=route.lease_ttl_ms,
            )
        return self.meter.admit(
            planned.customer,
            planned.amounts,
            None,
            estimates=planned.estimates,
            # Milliseconds end to end: a configured `1500ms` holds 1.5 s, not 1 s.
            hold_ttl_ms=route.reserve_ttl_ms,
            lease_ttl_ms=route.lease_ttl_ms,
            attempt=attempt,
            operation=operation or None,
        )

    def _known(self, key: str) -> str | None:
        """The customer remembered for `key`, without asking storage."""
        return self._keys.get(key, time.monotonic())

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
        refund_on: frozenset[int] = frozenset(),
    ) -> Iterable[bytes]:
        """Run the app with our fields added; `on_end` runs once, however the response ends,
        and is told to refund when the status is in `refund_on` or the app raised before
        answering (a 500).

        `response_headers` is filled with the response's fields (lowercased) for `tap` to read.
        """
        response_headers = {} if response_headers is None else response_headers
        ended = threading.Lock()
        answered = [500]

        def end() -> None:
            if ended.acquire(blocking=False):
                on_end(response_headers, answered[0] in refund_on)

        def metered_start_response(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            code = status[:3]
            answered[0] = int(code) if code.isdigit() else 500
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
        attempt: str = "",
        operation: str = "",
    ) -> Iterable[bytes]:
        """Answer 503 (refunding the admission, if sent, once storage is back), or let the request
        through and record it later under the lost admission's attempt (`open`)."""
        if self.config.storage.on_failure == "closed":
            if attempt:
                self.recovery.refund(planned.customer, attempt, operation)
            return _answer(start_response, self.gate.unavailable())
        # The same request retried with its Idempotency-Key while storage is down is recorded
        # once; another request under that key (another fingerprint, body included) is its own.
        key = planned.idempotency_key
        op = f"degraded-{uuid.uuid4().hex}"
        if key:
            data = self._whole_body(environ)
            if data is None:
                if attempt:
                    self.recovery.refund(planned.customer, attempt, operation)
                return _answer(start_response, too_large(self.config.proxy.max_body_bytes))
            fp = idempotency.fingerprint(
                environ.get("REQUEST_METHOD", "GET"),
                normalize_decoded(_path(environ)),
                environ.get("QUERY_STRING", ""),
                {**planned.amounts, **planned.estimates},
                hashlib.sha256(data).hexdigest(),
            )
            op = idempotency.degraded_operation(key, fp)
        response_headers: dict[str, str] = {}
        route = planned.route
        tap = WsgiResponseTap(route, response_headers) if route.body_costs else None

        def defer(response_headers: Mapping[str, str], refunded: bool) -> None:
            item = None
            if not refunded:
                found = tap.found() if tap is not None else None
                item = self.gate.deferred(
                    planned, response_headers, op, api_key, found=found, attempt=attempt
                )
            if item is not None:
                self.recovery.record(item)
            elif attempt:
                self.recovery.refund(planned.customer, attempt, operation)

        return self._forward(
            environ, start_response, DEGRADED, defer, response_headers, tap, route.refund_on
        )
