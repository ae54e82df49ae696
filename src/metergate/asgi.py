"""`MeteringMiddleware`: pure ASGI metering around any ASGI app (FastAPI, Starlette, Django)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from metergate.config import GatewayConfig
from metergate.core.errors import StorageUnavailable
from metergate.core.http import Admission, Answer, Gate, ratelimit_fields
from metergate.core.model import Decision
from metergate.meter import AsyncMeter, ConfigSource, as_config

__all__ = ["MeteringMiddleware"]

logger = logging.getLogger("metergate")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Identify = Callable[[Scope], "str | None | Awaitable[str | None]"]

KEY_CACHE_S = 5.0
DEGRADED_BUFFER = 100_000


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
    """Meter every routed request of an ASGI app: admit, answer refusals, settle at the end."""

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
        self.timeout_s = self.config.storage.timeout_ms / 1000
        self._keys: dict[str, tuple[str, float]] = {}
        # Admissions made while storage was down in `open` mode, replayed once it is back.
        self._degraded: deque[Admission] = deque(maxlen=DEGRADED_BUFFER)
        self._draining = False

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
        try:
            customer = await self._customer(scope, headers)
        except (StorageUnavailable, TimeoutError):
            await self._storage_failed(scope, receive, send, None)
            return
        if customer is None:
            await _send_answer(send, self.gate.refusal(_unauthenticated(), self.clock()))
            return
        planned = self.gate.admission(customer, route, headers, scope)
        if isinstance(planned, Answer):
            await _send_answer(send, planned)
            return
        try:
            decision = await asyncio.wait_for(self._admit(planned), self.timeout_s)
        except (StorageUnavailable, TimeoutError):
            await self._storage_failed(scope, receive, send, planned)
            return
        if not decision.allowed:
            await _send_answer(send, self.gate.refusal(decision, self.clock()))
            return
        if self._degraded and not self._draining:
            asyncio.get_running_loop().create_task(self._drain())
        await self._forward(scope, receive, send, planned, decision)

    async def _admit(self, planned: Admission) -> Decision:
        route = planned.route
        return await self.meter.admit(
            planned.customer,
            planned.amounts,
            planned.idempotency_key,
            estimates=planned.estimates,
            hold_ttl_s=max(1, route.reserve_ttl_ms // 1000),
            lease_ttl_s=route.lease_ttl_ms // 1000 if route.lease_ttl_ms else None,
        )

    async def _customer(self, scope: Scope, headers: dict[str, str]) -> str | None:
        if self.identify is not None:
            found = self.identify(scope)
            if inspect.isawaitable(found):
                found = await found
            return found
        key = self.gate.key_of(headers)
        if key is None:
            return None
        now = time.monotonic()
        cached = self._keys.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        customer = await asyncio.wait_for(self.meter.customer_for_key(key), self.timeout_s)
        if customer is not None:
            if len(self._keys) > 100_000:
                self._keys.clear()
            self._keys[key] = (customer, now + KEY_CACHE_S)
        return customer

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        planned: Admission,
        decision: Decision,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        fields = extra if extra is not None else ratelimit_fields(decision, self.clock())
        added = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields]
        response_headers: dict[str, str] = {}
        ticket = decision.ticket
        settled = False

        async def settle() -> None:
            nonlocal settled
            if settled or ticket is None:
                return
            settled = True
            try:
                await self.meter.settle(ticket, self.gate.actuals(planned, response_headers))
            except Exception:  # the hold or lease expires on its own; never fail the response
                logger.exception("metergate: settlement failed; the hold will expire")

        async def metered_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                # The app's own headers stay untouched; ours are appended.
                for k, v in message.get("headers", ()):
                    response_headers[k.decode("latin-1").lower()] = v.decode("latin-1")
                message = {**message, "headers": [*message.get("headers", ()), *added]}
                await send(message)
                return
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await settle()

        try:
            await self.app(scope, receive, metered_send)
        finally:
            # App raised, client went away, or the body never finished: settle anyway.
            if not settled and ticket is not None:
                await asyncio.shield(settle())

    async def _storage_failed(
        self, scope: Scope, receive: Receive, send: Send, planned: Admission | None
    ) -> None:
        if self.config.storage.on_failure == "closed" or planned is None:
            await _send_answer(send, self.gate.unavailable())
            return
        if len(self._degraded) == self._degraded.maxlen:
            logger.error("metergate: degraded buffer full; dropping the oldest unmetered request")
        planned.idempotency_key = planned.idempotency_key or _degraded_key()
        self._degraded.append(planned)
        decision = Decision(True, 200, None, planned.customer, degraded=True)
        await self._forward(scope, receive, send, planned, decision, [("metergate-degraded", "?1")])

    async def _drain(self) -> None:
        """Meter what was let through while storage was down, once each (same idempotency key)."""
        self._draining = True
        try:
            while self._degraded:
                planned = self._degraded[0]
                try:
                    decision = await asyncio.wait_for(
                        self._admit_fact(planned), self.timeout_s * 10
                    )
                except (StorageUnavailable, TimeoutError):
                    return
                self._degraded.popleft()
                if decision.ticket is not None:
                    await self.meter.settle(decision.ticket)
        finally:
            self._draining = False

    async def _admit_fact(self, planned: Admission) -> Decision:
        return await self.meter.admit(
            planned.customer,
            {**planned.amounts, **{m: r for m, r in planned.estimates.items()}},
            planned.idempotency_key,
        )

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped_send(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.meter.aclose()
            await send(message)

        await self.app(scope, receive, wrapped_send)


def _degraded_key() -> str:
    import uuid

    return "degraded-" + uuid.uuid4().hex


def _unauthenticated() -> Decision:
    return Decision(False, 401, "unauthenticated", "", detail="no API key, or a key nobody holds")
