"""`MeteringMiddleware`: pure ASGI metering around any ASGI app (FastAPI, Starlette, Django)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from metergate.bodytap import AsgiResponseTap, read_reserves_asgi
from metergate.config import GatewayConfig
from metergate.core import idempotency
from metergate.core import request as steps
from metergate.core.errors import StorageUnavailable
from metergate.core.http import (
    GATEWAY_ANSWER,
    Admission,
    Answer,
    Gate,
    KeyCache,
    problem,
    too_large,
)
from metergate.core.model import Decision
from metergate.core.paths import BadPath, bad_request, normal_scope
from metergate.meter import AsyncMeter, ConfigSource, as_config
from metergate.observability import STORAGE_ERRORS
from metergate.recovery import Recovery

__all__ = ["MeteringMiddleware"]

logger = logging.getLogger("metergate")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Identify = Callable[[Scope], "str | Awaitable[str | None] | None"]
OnEnd = Callable[[Mapping[str, str], bool], Awaitable[None]]

SHUTDOWN_DRAIN_S = 5.0
DEGRADED = [("metergate-degraded", "?1")]


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that gives `body` (read already) as one message, then the client's messages."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_answer(send: Send, answer: Answer) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": answer.status,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers],
        }
    )
    await send({"type": "http.response.body", "body": answer.body})


class MeteringMiddleware:
    """Meter every routed request of an ASGI app: admit, answer refusals, settle at the end.

    `identify(scope)` (sync or async) replaces the API-key lookup and returns the customer id;
    `costs={metric: f}` replaces a route's cost of `metric` with `f(scope)`, an int.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: ConfigSource,
        *,
        meter: AsyncMeter | None = None,
        identify: Identify | None = None,
        costs: Mapping[str, Callable[[Scope], int]] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.app = app
        self.config: GatewayConfig = as_config(config)
        self.clock = clock or time.time
        self.meter = meter or AsyncMeter(self.config, clock=self.clock)
        self.gate = Gate(self.config, costs=costs)
        self.identify = identify
        # The embedded backend runs in this process and cannot be unreachable: a budget would
        # only turn a busy moment into 503s.
        embedded = self.config.storage.url.startswith("memory://")
        self.timeout_s = None if embedded else self.config.storage.timeout_ms / 1000
        self._keys = KeyCache(self.meter.core.revocations)
        self._lookups: dict[str, asyncio.Future[str | None]] = {}
        # Refunds of admissions whose reply was lost, and requests let through while storage was
        # down (`on_failure: open`): a background task runs them as soon as storage answers.
        self.recovery = Recovery(self.meter)
        # The start-up connect (kept referenced: the event loop holds tasks only weakly).
        self._starting: asyncio.Future[None] | None = None
        # Settlements that outlive their request (client gone, task cancelled) are kept here so
        # the event loop does not drop them half-way.
        self._settling: set[asyncio.Future[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            # Routes match, and the app (or upstream) gets, the normalized path.
            scope = normal_scope(scope)
        except BadPath as exc:
            await _send_answer(send, bad_request(exc))
            return
        headers = _headers(scope)
        flow = steps.request_flow(
            self.gate,
            self.meter.book,
            self.meter.core.new_attempt,
            self.clock,
            time.monotonic,
            scope["method"],
            scope["path"],
            headers,
            scope,
            keyless=self.identify is not None,
            known=self._known,
        )
        verdict, receive = await self._drive(flow, scope, receive, headers)
        await self._act(verdict, scope, receive, send)

    async def _drive(
        self, flow: steps.Flow, scope: Scope, receive: Receive, headers: Mapping[str, str]
    ) -> tuple[steps.Verdict, Receive]:
        """Run a request flow to its verdict, doing the I/O it asks for."""
        reply: Any = None
        failed: StorageUnavailable | None = None
        while True:
            try:
                need = flow.send(reply) if failed is None else flow.throw(failed)
            except StopIteration as stop:
                return stop.value, receive
            reply, failed = None, None
            try:
                if isinstance(need, steps.Admit):
                    reply = await self._admit(need.planned, need.attempt, "")
                elif isinstance(need, steps.Identify):
                    reply = await self._customer(scope, need.key)
                else:
                    receive, reply = await read_reserves_asgi(receive, need.route, headers)
            except TimeoutError:
                failed = StorageUnavailable("storage did not answer in time")
            except StorageUnavailable as exc:
                failed = exc

    async def _act(self, verdict: steps.Verdict, scope: Scope, receive: Receive, send: Send) -> str:
        """Do what a flow decided; return `refused`, `unavailable`, `refunded` or `served`."""
        if isinstance(verdict, steps.Local):
            await self._serve_local(scope, receive, send, verdict)
            return "served"
        if isinstance(verdict, steps.Forward):
            return await self._serve(scope, receive, send, verdict)
        if isinstance(verdict, steps.PassThrough):
            await self.app(scope, receive, send)
            return "served"
        if isinstance(verdict, steps.Respond):
            await _send_answer(send, verdict.answer)
            return "refused"
        if isinstance(verdict, steps.Keyed):
            await self._keyed(scope, receive, send, verdict.planned)
            return "served"
        if isinstance(verdict, steps.Degraded):
            await self._storage_failed(
                scope, receive, send, verdict.planned, verdict.api_key, verdict.attempt
            )
            return "unavailable"
        return "refused"  # Gone: the client left while sending its body

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, verdict: steps.Forward
    ) -> str:
        """Forward an admitted request; settle or refund its admission when the response ends.
        Returns `refunded` or `served`."""
        planned, decision = verdict.planned, verdict.decision
        ticket = decision.ticket
        tap = AsgiResponseTap(planned.route) if planned.route.body_costs else None

        outcome = "served"

        async def settle(response_headers: Mapping[str, str], refunded: bool) -> None:
            nonlocal outcome
            if ticket is None:
                return
            if refunded:
                outcome = "refunded"
                # the customer did not get what it paid for: undo the admission, holds too
                if ticket.allowance is not None:  # given in process: it goes back unused
                    await self.meter.refund_ticket(ticket)
                else:
                    await self._refund(ticket.customer, ticket.attempt, ticket.operation)
                return
            # After a disconnect, what the body reported so far (a complete event), else the
            # reserve.
            found = tap.found() if tap is not None else None
            try:
                await self.meter.settle(ticket, self.gate.actuals(planned, response_headers, found))
            except Exception:  # the hold or lease expires on its own; never fail the response
                logger.exception("metergate: settlement failed; the hold will expire")

        scope["metergate.customer"] = planned.customer  # the proxy caps connections per customer
        await self._forward(
            scope,
            receive,
            send,
            verdict.fields,
            settle,
            read_headers=bool(planned.response_costs),
            refund_on=planned.route.refund_on,
            tap=tap,
        )
        return outcome

    async def _serve_local(
        self, scope: Scope, receive: Receive, send: Send, verdict: steps.Local
    ) -> None:
        """Forward a request given from a local allowance, with the fields storage would give,
        and give it back to the allowance if it is refunded."""
        scope["metergate.customer"] = verdict.customer  # the proxy caps connections per customer
        book, allowance = self.meter.book, verdict.allowance
        assert book is not None

        async def end(_headers: Mapping[str, str], refunded: bool) -> None:
            book.release(allowance, refunded)

        await self._forward(
            scope,
            receive,
            send,
            [],
            end,
            read_headers=False,
            refund_on=verdict.refund_on,
            added=allowance.raw_fields(verdict.left, verdict.now_s),
        )

    async def _keyed(self, scope: Scope, receive: Receive, send: Send, planned: Admission) -> None:
        """Serve a request carrying Idempotency-Key once: claim the key with the request's
        fingerprint (the body read whole for its digest), replay a completed one, refuse a
        conflict or a duplicate in flight, and store the response when it may be replayed."""
        key = str(planned.idempotency_key)
        body = await self._whole_body(receive, send)
        if body is None:
            return
        query = scope.get("query_string", b"").decode("latin-1")
        fp = idempotency.fingerprint(
            scope["method"],
            scope["path"],
            query,
            {**planned.amounts, **planned.estimates},
            hashlib.sha256(body).hexdigest(),
        )
        keys, customer = self.meter.core.keys, planned.customer
        in_flight_ms = self.config.proxy.timeout_s * 1000 + 60_000
        try:
            claim = await self.meter.run(idempotency.claim(keys, customer, key, fp, in_flight_ms))
        except (StorageUnavailable, TimeoutError):
            STORAGE_ERRORS.inc()
            await _send_answer(send, self.gate.unavailable())
            return
        if claim.outcome == "replay" and claim.stored is not None:
            stored = claim.stored
            await _send_answer(
                send,
                Answer(
                    stored.status,
                    [
                        *stored.headers,
                        ("content-length", str(len(stored.body))),
                        ("idempotent-replayed", "true"),
                    ],
                    stored.body,
                ),
            )
            return
        if claim.outcome != "proceed":
            retry = [("retry-after", "1")] if claim.outcome == "idempotency-in-flight" else []
            detail = (
                "a request with this Idempotency-Key is still in flight"
                if retry
                else "this Idempotency-Key was used with a different request"
            )
            await _send_answer(send, problem(claim.outcome, 409, detail, retry))
            return

        sent = False

        async def replayed() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        max_bytes = self.config.idempotency.max_response_bytes
        captured: dict[str, Any] = {
            "status": 0,
            "headers": [],
            "body": bytearray(),
            "over": False,
            "whole": False,  # the app sent its last body message: a stream cut short is not kept
        }

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                captured["status"] = message["status"]
                captured["headers"] = [
                    (k.decode("latin-1"), v.decode("latin-1"))
                    for k, v in message.get("headers", ())
                ]
            elif message["type"] == "http.response.body" and not captured["over"]:
                captured["body"] += message.get("body", b"")
                if len(captured["body"]) > max_bytes:
                    captured["over"], captured["body"] = True, bytearray()
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                captured["whole"] = True

        outcome = "unavailable"
        try:
            admission = steps.admission_flow(
                self.gate, planned, self.meter.core.new_attempt(), self.clock, time.monotonic
            )
            verdict, _ = await self._drive(admission, scope, replayed, {})
            outcome = await self._act(verdict, scope, replayed, capture)
        finally:
            try:
                if (
                    outcome == "served"
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
                await self.meter.run(flow)
            except Exception:
                logger.exception("metergate: could not record the outcome of Idempotency-Key")

    async def _whole_body(self, receive: Receive, send: Send) -> bytes | None:
        """Read a request's body whole, up to `proxy.max_body_bytes`; None when the client left
        or the body was too large (answered 413)."""
        limit = self.config.proxy.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_answer(send, too_large(limit))
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refund(self, customer: str, attempt: str, operation: str) -> None:
        try:
            await self.meter.refund(customer, attempt, operation)
        except (StorageUnavailable, TimeoutError):
            self.recovery.refund(customer, attempt, operation)
        except Exception:
            logger.exception("metergate: refund of %s failed", attempt)

    async def _admit(self, planned: Admission, attempt: str, operation: str) -> Decision:
        route = planned.route
        if not planned.estimates and not operation and not planned.idempotency_key:
            # fixed amounts, no Idempotency-Key: from this process's allowance when allowances are on
            return await self.meter.admit_request(
                planned.customer,
                planned.amounts,
                attempt=attempt,
                hold_ttl_ms=route.reserve_ttl_ms,
                lease_ttl_ms=route.lease_ttl_ms,
            )
        return await self.meter.admit(
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

    async def _customer(self, scope: Scope, key: str | None) -> str | None:
        if self.identify is not None:
            found = self.identify(scope)
            if inspect.isawaitable(found):
                found = await found
            return found
        if key is None:
            return None
        now = time.monotonic()
        cached = self._keys.get(key, now)
        if cached is not None:
            return cached
        # One lookup per key at a time: when a remembered key expires under load, the requests
        # arriving meanwhile wait for that lookup instead of each sending their own.
        pending = self._lookups.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(key, now))
            self._lookups[key] = pending
            pending.add_done_callback(functools.partial(self._lookup_done, key))
        return await asyncio.shield(pending)

    def _lookup_done(self, key: str, future: asyncio.Future[str | None]) -> None:
        self._lookups.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved: a failure nobody waited for is not logged as lost

    async def _lookup(self, key: str, now: float) -> str | None:
        # Connecting and loading the configured customers happen once per process, shared and
        # bounded call by call: a slow start-up (a busy machine) must not spend, all at once,
        # the budget of every request waiting for this lookup.
        await self.meter.start()
        async with asyncio.timeout(self.timeout_s):
            customer = await self.meter.customer_for_key(key)
        if customer is not None:
            self._keys.put(key, customer, now)
        return customer

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        fields: list[tuple[str, str]],
        on_end: OnEnd,
        *,
        read_headers: bool = True,
        tap: AsgiResponseTap | None = None,
        refund_on: frozenset[int] = frozenset(),
        added: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Run the app with our fields added (`added`: already encoded); `on_end` runs once,
        however the response ends.

        `on_end` gets the response's header fields (lowercased) when `read_headers`, else none,
        and whether the admission is to be refunded: the status is in `refund_on`, the gateway
        answered itself (413, 400, 502, 504), or the app raised before answering (a 500).
        """
        if added is None:
            added = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields]
        response_headers: dict[str, str] = {}
        ended = False
        trailers = False
        status = 500  # what the server answers when the app raises before starting a response
        own = False

        async def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                await on_end(response_headers, own or status in refund_on)

        async def metered_send(message: Message) -> None:
            nonlocal trailers, status, own
            if tap is not None:
                tap.see(message)  # scanned as it passes; never held back
            if message["type"] == "http.response.start":
                status = message["status"]
                if message.get(GATEWAY_ANSWER):
                    own = True
                    message = {k: v for k, v in message.items() if k != GATEWAY_ANSWER}
                # With trailers announced, the response ends with its last trailer message.
                trailers = bool(message.get("trailers", False))
                # The app's own headers stay untouched; ours are appended.
                if read_headers:
                    for k, v in message.get("headers", ()):
                        response_headers[k.decode("latin-1").lower()] = v.decode("latin-1")
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            elif (
                message["type"] == "http.response.body"
                and not message.get("more_body", False)
                and not trailers
            ) or (
                message["type"] == "http.response.trailers"
                and not message.get("more_trailers", False)
            ):
                # Settle before the last bytes leave: a client that has read the whole response
                # (and sends its next request) finds its lease ended and its units counted.
                await end()
            await send(message)

        try:
            await self.app(scope, receive, metered_send)
        finally:
            if not ended:
                # The app raised, the client went away, or the task is being cancelled: settle
                # anyway, in a task of its own that a cancellation of this one cannot stop.
                task = asyncio.ensure_future(end())
                self._settling.add(task)
                task.add_done_callback(self._settling.discard)
                await asyncio.shield(task)

    async def _storage_failed(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        planned: Admission,
        api_key: str | None,
        attempt: str = "",
        operation: str = "",
    ) -> None:
        """Answer for storage that did not answer: 503 (its admission, if sent, is refunded once
        storage is back), or let the request through and record it later (`open`)."""
        if self.config.storage.on_failure == "closed":
            if attempt:
                # The admission may still arrive, or may have been applied with its reply lost.
                self.recovery.refund(planned.customer, attempt, operation)
            await _send_answer(send, self.gate.unavailable())
            return
        # The same request retried with its Idempotency-Key while storage is down is recorded
        # once; another request under that key (another fingerprint, body included) is its own.
        key = planned.idempotency_key
        op = f"degraded-{uuid.uuid4().hex}"
        if key:
            body = await self._whole_body(receive, send)
            if body is None:
                if attempt:
                    self.recovery.refund(planned.customer, attempt, operation)
                return
            fp = idempotency.fingerprint(
                scope["method"],
                scope["path"],
                scope.get("query_string", b"").decode("latin-1"),
                {**planned.amounts, **planned.estimates},
                hashlib.sha256(body).hexdigest(),
            )
            op = idempotency.degraded_operation(key, fp)
            receive = _replaying(body, receive)
        tap = AsgiResponseTap(planned.route) if planned.route.body_costs else None

        async def defer(response_headers: Mapping[str, str], refunded: bool) -> None:
            if refunded:
                if attempt:
                    self.recovery.refund(planned.customer, attempt, operation)
                return
            # Recorded under the lost admission's attempt: charged once whether or not it arrived.
            found = tap.found() if tap is not None else None
            item = self.gate.deferred(
                planned, response_headers, op, api_key, found=found, attempt=attempt
            )
            if item is None:
                if attempt:
                    self.recovery.refund(planned.customer, attempt, operation)
                return
            self.recovery.record(item)

        await self._forward(
            scope, receive, send, DEGRADED, defer, refund_on=planned.route.refund_on, tap=tap
        )

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                self.meter.reopen()  # a lifespan may start again after a shutdown
                # Connect and load the customers now rather than in the first requests.
                self._starting = asyncio.ensure_future(self.meter.start())
                self._starting.add_done_callback(_started)
            if message["type"] == "lifespan.shutdown.complete":
                if self._settling:
                    # settlements of responses that just ended, before their connection closes
                    await asyncio.wait(set(self._settling), timeout=SHUTDOWN_DRAIN_S)
                await self.recovery.close(SHUTDOWN_DRAIN_S)
                await self.meter.aclose()
            await send(message)

        await self.app(scope, receive, wrapped_send)


def _started(task: asyncio.Future[None]) -> None:
    """Done callback of the start-up connect: a failure is logged; requests try again."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        logger.warning("metergate: storage is not ready at start-up (%s); requests will retry", exc)
