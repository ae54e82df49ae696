"""One metered request as a flow: every decision in order, no I/O (sans-I/O, like httpx's
`auth_flow`).

The flow is a generator. It yields what it needs from the outside world and is sent the answer
(or has `StorageUnavailable` thrown into it); it returns what the adapter is to do. The ASGI and
WSGI middlewares (and so the proxy) are its drivers: they look customers up, read bodies, run
admissions and forward responses, and decide nothing themselves.

    yielded (the driver sends back)          returned (the driver then does)
    Identify(key)   -> customer or None      PassThrough       run the app untouched
    ReadReserves()  -> reserves or None      Respond(answer)   answer without the app
    Admit(planned)  -> Decision              Local(...)        forward; give back if refunded
                                             Forward(...)      forward; settle or refund
                                             Keyed(planned)    the Idempotency-Key flow
                                             Degraded(...)     storage down: 503, or pass (open)
                                             Gone              the client left: nothing owed
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

from metergate.core.allowances import Allowance, Book
from metergate.core.errors import StorageUnavailable
from metergate.core.http import Admission, Answer, CompiledRoute, Gate, ratelimit_fields
from metergate.core.model import Decision
from metergate.observability import STORAGE_ERRORS, observe, observe_local

__all__ = [
    "Admit",
    "Degraded",
    "Forward",
    "Gone",
    "Identify",
    "Keyed",
    "Local",
    "PassThrough",
    "ReadReserves",
    "Respond",
    "Verdict",
    "admission_flow",
    "request_flow",
]


# -- what the flow needs ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identify:
    """Look up the customer holding `key` (None: the middleware's `identify` decides)."""

    key: str | None


@dataclass(frozen=True, slots=True)
class ReadReserves:
    """Read the reserves of `route` from the request body, streaming it on to the app."""

    route: CompiledRoute


@dataclass(frozen=True, slots=True)
class Admit:
    """Run the admission of `planned` in storage (or from an allowance) under `attempt`."""

    planned: Admission
    attempt: str


Need = Identify | ReadReserves | Admit


# -- what the adapter does -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PassThrough:
    """Not metered: the app gets the request as it came (with its normalized path)."""


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer without reaching the app: a refusal, a bad request, an unknown route."""

    answer: Answer


@dataclass(frozen=True, slots=True)
class Local:
    """Forward a request given from this process's allowance; release it when it ends."""

    customer: str
    allowance: Allowance
    left: int
    """Requests the allowance has still free: its fields count them as not taken."""
    now_s: float
    refund_on: frozenset[int]


@dataclass(frozen=True, slots=True)
class Forward:
    """Forward an admitted request with `fields`; settle or refund `decision.ticket` at the end."""

    planned: Admission
    decision: Decision
    fields: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Keyed:
    """A request with an Idempotency-Key: claimed, replayed or served once (core.idempotency)."""

    planned: Admission


@dataclass(frozen=True, slots=True)
class Degraded:
    """Storage did not answer: 503 `metering-unavailable`, or through and recorded later."""

    planned: Admission
    api_key: str | None
    attempt: str


@dataclass(frozen=True, slots=True)
class Gone:
    """The client left while sending its body: nothing was admitted, nothing is owed."""


Verdict = PassThrough | Respond | Local | Forward | Keyed | Degraded | Gone
Flow = Generator[Need, Any, Verdict]

UNAUTHENTICATED = Decision(
    False, 401, "unauthenticated", "", detail="no API key, or a key nobody holds"
)


def request_flow(
    gate: Gate,
    book: Book | None,
    new_attempt: Callable[[], str],
    clock: Callable[[], float],
    monotonic: Callable[[], float],
    method: str,
    path: str,
    headers: Mapping[str, str],
    request: Any,
    *,
    keyless: bool = False,
    known: Callable[[str], str | None] | None = None,
) -> Flow:
    """Decide one request whose path is already normalized: route, identify, admit.

    `clock` gives epoch seconds (the fields' resets), `monotonic` a steady clock (allowances and
    timings); `request` is the framework's own (the ASGI scope or WSGI environ) for custom cost
    callables; `keyless` when the middleware identifies customers itself (`identify=`); `known`
    answers from the driver's key cache, so that a remembered key asks nothing."""
    route = gate.routes.match(method, path)
    if route is None:
        answer = gate.unmatched()
        return PassThrough() if answer is None else Respond(answer)
    if not route.costs:
        return PassThrough()
    key = None if keyless else gate.key_of(headers)
    customer = known(key) if known is not None and key is not None else None
    try:
        if customer is None:
            customer = yield Identify(key)
    except StorageUnavailable:
        # Nobody could be looked up: in `open` mode the request passes, billed to its key later.
        planned = gate.admission("", route, headers, request)
        if isinstance(planned, Answer):
            return Respond(planned)
        return Degraded(planned, key, "")
    if customer is None:
        return Respond(gate.refusal(UNAUTHENTICATED, clock()))
    if (
        book is not None
        and route.fixed is not None
        and not gate.costs
        and not headers.get("idempotency-key")
    ):
        # The fast path: given from this process's allowance, before anything is built.
        got = book.take_local((customer, route.fixed), monotonic())
        if got is not None:
            observe_local()
            allowance, left = got
            return Local(customer, allowance, left, clock(), route.refund_on)
    reserves = None
    if route.request_reserves:
        reserves = yield ReadReserves(route)
        if reserves is None:
            return Gone()
    planned = gate.admission(customer, route, headers, request, reserves)
    if isinstance(planned, Answer):
        return Respond(planned)
    if planned.idempotency_key:
        return Keyed(planned)
    return (yield from admission_flow(gate, planned, new_attempt(), clock, monotonic))


def admission_flow(
    gate: Gate,
    planned: Admission,
    attempt: str,
    clock: Callable[[], float],
    monotonic: Callable[[], float],
) -> Flow:
    """Admit a planned request: refuse it, forward it with its fields, or, when storage did not
    answer, degrade (`attempt` names the admission, so a late arrival is refunded or counted
    once)."""
    started = monotonic()
    try:
        decision: Decision = yield Admit(planned, attempt)
    except StorageUnavailable:
        STORAGE_ERRORS.inc()
        return Degraded(planned, None, attempt)
    observe(decision, monotonic() - started)
    if not decision.allowed:
        return Respond(gate.refusal(decision, clock()))
    return Forward(planned, decision, ratelimit_fields(decision, clock()))
