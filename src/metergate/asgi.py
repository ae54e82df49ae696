"""`MeteringMiddleware`: pure ASGI metering around any ASGI app (FastAPI, Starlette, Django)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from metergate.config import GatewayConfig
from metergate.core.errors import StorageUnavailable
from metergate.core.http import Admission, Answer, Deferred, Gate, KeyCache, ratelimit_fields
from metergate.core.model import Decision
from metergate.meter import AsyncMeter, ConfigSource, as_config
from metergate.observability import STORAGE_ERRORS, observe

__all__ = ["MeteringMiddleware"]

logger = logging.getLogger("metergate")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Identify = Callable[[Scope], "str | Awaitable[str | None] | None"]
OnEnd = Callable[[Mapping[str, str]], Awaitable[None]]

DEGRADED_BUFFER = 100_000
SHUTDOWN_DRAIN_S = 5.0
DEGRADED = [("metergate-degraded", "?1")]


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


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
        self._keys = KeyCache()
        self._lookups: dict[str, asyncio.Future[str | None]] = {}
        # Requests let through while storage was down (`on_failure: open`), recorded when it is
        # back.
        self._deferred: deque[Deferred] = deque(maxlen=DEGRADED_BUFFER)
        self._drain_task: asyncio.Task[None] | None = None
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
        route = self.gate.routes.match(scope["method"], scope["path"])
        if route is None:
            answer = self.gate.unmatched()
            if answer is None:
                await self.app(scope, receive, send)
            else:
                await _send_answer(send, answer)
            return
        if not route.costs:
            await self.app(scope, receive, send)
            return

        headers = _headers(scope)
        key = None if self.identify is not None else self.gate.key_of(headers)
        try:
            customer = await self._customer(scope, key)
        except (StorageUnavailable, TimeoutError):
            # Nobody could be looked up: in `open` mode the request passes, billed to its key later.
            planned = self.gate.admission("", route, headers, scope)
            if isinstance(planned, Answer):
                await _send_answer(send, planned)
            else:
                await self._storage_failed(scope, receive, send, planned, key)
            return
        if customer is None:
            await _send_answer(send, self.gate.refusal(_unauthenticated(), self.clock()))
            return
        planned = self.gate.admission(customer, route, headers, scope)
        if isinstance(planned, Answer):
            await _send_answer(send, planned)
            return
        started = time.perf_counter()
        try:
            # Every storage call is bounded by `storage.timeout_ms` on its own (the pipelined
            # connection's timer, the client's socket timeout), so no timer wraps the whole.
            decision = await self._admit(planned)
        except (StorageUnavailable, TimeoutError):
            STORAGE_ERRORS.inc()
            await self._storage_failed(scope, receive, send, planned, None)
            return
        observe(decision, time.perf_counter() - started)
        if not decision.allowed:
            await _send_answer(send, self.gate.refusal(decision, self.clock()))
            return
        self._start_drain()

        ticket = decision.ticket

        async def settle(response_headers: Mapping[str, str]) -> None:
            if ticket is None:
                return
            try:
                await self.meter.settle(ticket, self.gate.actuals(planned, response_headers))
            except Exception:  # the hold or lease expires on its own; never fail the response
                logger.exception("metergate: settlement failed; the hold will expire")

        fields = ratelimit_fields(decision, self.clock())
        await self._forward(scope, receive, send, fields, settle, read_headers=ticket is not None)

    async def _admit(self, planned: Admission) -> Decision:
        route = planned.route
        return await self.meter.admit(
            planned.customer,
            planned.amounts,
            planned.idempotency_key,
            estimates=planned.estimates,
            hold_ttl_s=max(1, route.reserve_ttl_ms // 1000),
            lease_ttl_s=max(1, route.lease_ttl_ms // 1000) if route.lease_ttl_ms else None,
        )

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
    ) -> None:
        """Run the app with our fields added; `on_end` runs once, however the response ends.

        `on_end` gets the response's header fields (lowercased) when `read_headers`, else none.
        """
        added = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields]
        response_headers: dict[str, str] = {}
        ended = False

        async def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                await on_end(response_headers)

        async def metered_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                # The app's own headers stay untouched; ours are appended.
                if read_headers:
                    for k, v in message.get("headers", ()):
                        response_headers[k.decode("latin-1").lower()] = v.decode("latin-1")
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
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
    ) -> None:
        if self.config.storage.on_failure == "closed":
            await _send_answer(send, self.gate.unavailable())
            return
        # The same Idempotency-Key retried while storage is down is still recorded once.
        key = planned.idempotency_key
        operation = f"degraded:{key}" if key else f"degraded-{uuid.uuid4().hex}"

        async def defer(response_headers: Mapping[str, str]) -> None:
            item = self.gate.deferred(planned, response_headers, operation, api_key)
            if item is None:
                return
            if len(self._deferred) == self._deferred.maxlen:
                logger.error(
                    "metergate: degraded buffer full; the oldest unmetered request is dropped"
                )
            self._deferred.append(item)

        await self._forward(scope, receive, send, DEGRADED, defer)

    def _start_drain(self) -> None:
        if self._deferred and (self._drain_task is None or self._drain_task.done()):
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Record what was let through while storage was down, each under its own operation id."""
        while self._deferred:
            item = self._deferred[0]
            try:
                customer = item.customer
                if customer is None and item.api_key is not None:
                    customer = await self.meter.customer_for_key(item.api_key)
                if customer is not None:
                    decision = await self.meter.admit(customer, item.amounts, item.operation)
                    if not decision.allowed:
                        logger.warning(
                            "metergate: a request let through while storage was down was refused "
                            "afterwards (%s); it stays unrecorded",
                            decision.problem,
                        )
            except (StorageUnavailable, TimeoutError):
                return  # still down: the next admitted request starts another drain
            except Exception:
                logger.exception("metergate: could not record a request let through while down")
            self._deferred.popleft()

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
                if self._deferred:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._drain(), SHUTDOWN_DRAIN_S)
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


def _unauthenticated() -> Decision:
    return Decision(False, 401, "unauthenticated", "", detail="no API key, or a key nobody holds")
