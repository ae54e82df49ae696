"""HTTP, sans-I/O: routes, identity, what a request costs, the answers (problem+json, RateLimit).

Both adapters (ASGI and WSGI) and the reverse proxy drive a `Gate`: it turns a request's method,
path and headers into an admission to run, and a Decision into the response status, headers and
body.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from metergate.config import CostConfig, GatewayConfig, RequestReserveConfig, RouteConfig
from metergate.core.bodies import MAX_SCAN_BYTES, BodyCost, JsonPointer, RequestReserve
from metergate.core.model import Decision
from metergate.core.revocations import CHECK_S, Revocations

__all__ = [
    "GATEWAY_ANSWER",
    "Admission",
    "Answer",
    "CompiledRoute",
    "Deferred",
    "Gate",
    "KeyCache",
    "MeteredCost",
    "RouteTable",
    "api_key_from",
    "problem",
    "ratelimit_fields",
    "refund_statuses",
    "too_large",
]

TITLES = {
    "unauthenticated": "Unauthenticated",
    "not-entitled": "Not entitled",
    "asset-suspended": "Asset suspended",
    "balance-suspended": "Balance suspended",
    "insufficient-credits": "Insufficient credits",
    "quota-exceeded": "Quota exceeded",
    "rate-limited": "Rate limited",
    "metering-unavailable": "Metering unavailable",
    "idempotency-conflict": "Idempotency conflict",
    "idempotency-in-flight": "Idempotency key in flight",
    "body-too-large": "Body too large",
    "not-metered": "Not metered",
    "invalid-request": "Invalid request",
    "not-found": "Not found",
    "bad-gateway": "Bad gateway",
    "gateway-timeout": "Gateway timeout",
}

GATEWAY_ANSWER = "metergate.gateway_answer"
"""A key in an ASGI `http.response.start` message marking an answer the gateway itself gave after
admitting (413, 400, 502, 504): its admission is always refunded."""

_SEGMENT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?\}")


def _template_regex(path: str) -> re.Pattern[str]:
    out, pos = "", 0
    for match in _SEGMENT.finditer(path):
        out += re.escape(path[pos : match.start()])
        out += "(?:.*)" if match.group(2) else "(?:[^/]+)"
        pos = match.end()
    out += re.escape(path[pos:])
    return re.compile(out + r"\Z")


@dataclass(frozen=True, slots=True)
class MeteredCost:
    """How one metric of a route is costed: a constant, a request header, or a response header."""

    metric: str
    constant: int = 1
    header: str | None = None
    response_header: str | None = None
    reserve: int = 0
    body: BodyCost | None = None
    """Set when the cost is read from the response body or a trailer."""
    request_reserve: RequestReserve | None = None
    """Set when the reserve is read from the request body (`reserve` is then its default)."""


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """A route with its path regex, methods and costs, compiled once at start."""

    path: str
    regex: re.Pattern[str]
    methods: frozenset[str] | None
    costs: tuple[MeteredCost, ...]
    reserve_ttl_ms: int
    lease_ttl_ms: int | None
    body_costs: tuple[BodyCost, ...] = ()
    request_reserves: tuple[tuple[str, RequestReserve], ...] = ()
    """metric -> reserve read from the request body, as pairs (the route stays hashable)."""
    request_scan_bytes: int = MAX_SCAN_BYTES
    refund_on: frozenset[int] = frozenset()
    """The response statuses whose admission is refunded."""
    fixed: tuple[tuple[str, int], ...] | None = None
    """(metric, units) of every cost when all are constants: such a request may be admitted
    from a local allowance without building an Admission."""


def _methods(methods: Sequence[str] | None) -> frozenset[str] | None:
    if not methods:
        return None
    upper = {m.upper() for m in methods}
    # Frameworks answer HEAD with the GET handler: a HEAD must not slip past a GET route unmetered.
    if "GET" in upper:
        upper.add("HEAD")
    return frozenset(upper)


def _compile_route(route: RouteConfig) -> CompiledRoute:
    costs = []
    for meter in route.meter:
        cost = meter.cost
        if isinstance(cost, CostConfig):
            costs.append(_compile_cost(meter.metric, cost))
        else:
            costs.append(MeteredCost(meter.metric, constant=cost))
    scan = [m.cost.max_scan_bytes for m in route.meter if isinstance(m.cost, CostConfig)]
    return CompiledRoute(
        path=route.path,
        regex=_template_regex(route.path),
        methods=_methods(route.methods),
        costs=tuple(costs),
        reserve_ttl_ms=route.reserve_ttl,
        lease_ttl_ms=route.lease_ttl,
        body_costs=tuple(c.body for c in costs if c.body is not None),
        request_reserves=tuple(
            (c.metric, c.request_reserve) for c in costs if c.request_reserve is not None
        ),
        request_scan_bytes=max([n for n in scan if n is not None] or [MAX_SCAN_BYTES]),
        refund_on=refund_statuses(route.refund_on),
        fixed=tuple((c.metric, c.constant) for c in costs)
        if costs
        and all(
            c.header is None
            and c.response_header is None
            and c.body is None
            and c.request_reserve is None
            and c.constant > 0
            for c in costs
        )
        else None,
    )


def _compile_cost(metric: str, cost: CostConfig) -> MeteredCost:
    scan = cost.max_scan_bytes or MAX_SCAN_BYTES
    body = None
    if cost.response_json is not None:
        body = BodyCost(metric, pointer=JsonPointer(cost.response_json), max_scan_bytes=scan)
    elif cost.response_trailer is not None:
        body = BodyCost(metric, trailer=cost.response_trailer.lower())
    reserve, from_request = cost.reserve, None
    if isinstance(reserve, RequestReserveConfig):
        from_request = RequestReserve(JsonPointer(reserve.request_json), reserve.default)
        reserve = reserve.default
    return MeteredCost(
        metric,
        header=cost.header,
        response_header=cost.response_header,
        reserve=reserve or 0,
        body=body,
        request_reserve=from_request,
    )


def refund_statuses(items: Sequence[int | str]) -> frozenset[int]:
    """Expand `refund_on` items (`502`, `"5xx"`) into the set of statuses they name."""
    out: set[int] = set()
    for item in items:
        if isinstance(item, int):
            out.add(item)
        else:
            first = int(item[0]) * 100
            out.update(range(first, first + 100))
    return frozenset(out)


class RouteTable:
    """The configured routes, first match wins."""

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes = tuple(_compile_route(r) for r in routes)

    def match(self, method: str, path: str) -> CompiledRoute | None:
        """Return the first route matching the method and path, or None."""
        for route in self.routes:
            if route.methods is not None and method not in route.methods:
                continue
            if route.regex.match(path):
                return route
        return None


def api_key_from(value: str | None) -> str | None:
    """Return the API key in a header value: `Bearer <key>` or the bare key."""
    if not value:
        return None
    value = value.strip()
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    return value or None


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete response: status, headers and body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def problem(
    slug: str,
    status: int,
    detail: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    **extra: Any,
) -> Answer:
    """Build an RFC 9457 problem+json answer of type `urn:metergate:problem:<slug>`."""
    body: dict[str, Any] = {
        "type": f"urn:metergate:problem:{slug}",
        "title": TITLES.get(slug, slug.replace("-", " ").capitalize()),
        "status": status,
    }
    if detail:
        body["detail"] = detail
    body.update({k: v for k, v in extra.items() if v is not None})
    data = json.dumps(body, separators=(",", ":")).encode()
    return Answer(
        status,
        [
            ("content-type", "application/problem+json"),
            ("content-length", str(len(data))),
            *headers,
        ],
        data,
    )


def too_large(limit: int) -> Answer:
    """Build the 413 answer for a request body over `limit` bytes."""
    return problem("body-too-large", 413, f"the request body exceeds {limit} bytes")


@functools.lru_cache(maxsize=4096)
def sf_string(value: str) -> str:
    """An RFC 8941 String item."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=4096)
def _policy_item(name: str, limit: int, window: int | None, unit: str | None = None) -> str:
    """One RateLimit-Policy item; its parts change only with the plan or the period."""
    item = f"{sf_string(name)};q={limit}"
    if unit is not None:
        item += f";qu={sf_string(unit)}"
    return item if window is None else f"{item};w={window}"


def ratelimit_fields(decision: Decision, now_s: float) -> list[tuple[str, str]]:
    """Return RateLimit-Policy, RateLimit, Metergate-Level and Metergate-Balance for a decision."""
    policies: list[str] = []
    limits: list[str] = []
    for metric, usage in decision.assets.items():
        if usage.limit is not None:
            start, end = usage.period_start, usage.period_end
            if start is not None and end is not None:
                policies.append(_policy_item(metric, usage.limit, end - start))
                reset = max(0, math.ceil(end - now_s))
                limits.append(f"{sf_string(metric)};r={usage.remaining or 0};t={reset}")
            else:
                unit = "concurrent-requests" if usage.concurrent else None
                policies.append(_policy_item(metric, usage.limit, None, unit))
                limits.append(f"{sf_string(metric)};r={usage.remaining or 0}")
        if usage.throttle is not None:
            name = f"{metric}-throttle"
            policies.append(_policy_item(name, usage.throttle.limit, usage.throttle.per_s))
            limits.append(f"{sf_string(name)};r={usage.throttle.remaining}")
    fields: list[tuple[str, str]] = []
    if policies:
        fields.append(("ratelimit-policy", ", ".join(policies)))
        fields.append(("ratelimit", ", ".join(limits)))
    if decision.level:
        fields.append(("metergate-level", decision.level))
    if len(decision.balances) == 1:
        fields.append(("metergate-balance", str(next(iter(decision.balances.values())))))
    elif decision.balances:
        fields.append(
            ("metergate-balance", ", ".join(f"{k}={v}" for k, v in decision.balances.items()))
        )
    return fields


@dataclass(slots=True)
class Admission:
    """What a matched request asks of the meter."""

    customer: str
    route: CompiledRoute
    amounts: dict[str, int]
    estimates: dict[str, int]
    idempotency_key: str | None
    response_costs: dict[str, tuple[str, int]] = field(default_factory=dict)
    """metric -> (response header, reserve): settled from the response."""
    body_costs: dict[str, int] = field(default_factory=dict)
    """metric -> reserve, for costs read from the response body or a trailer."""


@dataclass(frozen=True, slots=True)
class Deferred:
    """A request let through unmetered while storage was down (`on_failure: open`).

    It is recorded once storage answers again, under its own operation id, so that recording it
    twice (after a timeout whose outcome is unknown) counts it once.
    """

    customer: str | None
    api_key: str | None
    """The key to look the customer up by, when storage was down before it could be."""
    amounts: dict[str, int]
    operation: str
    attempt: str = ""
    """The attempt id of the admission that timed out: recorded under it, it counts once even
    when that admission arrived late."""
    actuals: dict[str, int] = field(default_factory=dict)
    """The response-priced metrics' actual units: they settle the late admission's hold."""


class Gate:
    """The HTTP decisions of metering, shared by the ASGI and WSGI adapters and the proxy."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        costs: Mapping[str, Callable[[Any], int]] | None = None,
    ) -> None:
        self.config = config
        self.routes = RouteTable(config.routes)
        self.identity_header = config.identity.header.lower()
        self.costs = dict(costs or {})

    def key_of(self, headers: Mapping[str, str]) -> str | None:
        """Return the API key a request carries (never logged)."""
        return api_key_from(headers.get(self.identity_header))

    def unmatched(self) -> Answer | None:
        """Return the answer for a request no route matches (None: pass it through)."""
        if self.config.unmatched == "deny":
            return problem("not-metered", 404, "no route of this gateway matches the request")
        return None

    def admission(
        self,
        customer: str,
        route: CompiledRoute,
        headers: Mapping[str, str],
        request: Any = None,
        reserves: Mapping[str, int] | None = None,
    ) -> Admission | Answer:
        """Work out what the request costs; an unreadable cost header answers 400.

        `reserves` are the reserves read from the request body (`reserve: {request_json: ...}`).

        A custom cost callable (`costs={metric: f}`) gets the framework's request (the ASGI scope
        or the WSGI environ) and must return an int; anything else raises InvalidAmount.
        """
        amounts: dict[str, int] = {}
        estimates: dict[str, int] = {}
        response_costs: dict[str, tuple[str, int]] = {}
        body_costs: dict[str, int] = {}
        for cost in route.costs:
            custom = self.costs.get(cost.metric)
            if custom is not None:
                # No int() here: a float or a numeric string from a callable is a bug to surface.
                amounts[cost.metric] = custom(request)
            elif cost.body is not None:
                reserve = (reserves or {}).get(cost.metric, cost.reserve)
                estimates[cost.metric] = body_costs[cost.metric] = reserve
            elif cost.response_header is not None:
                estimates[cost.metric] = cost.reserve
                response_costs[cost.metric] = (cost.response_header.lower(), cost.reserve)
            elif cost.header is not None:
                raw = headers.get(cost.header.lower(), "")
                if not re.fullmatch(r"\d{1,15}", raw.strip()):
                    return problem(
                        "invalid-request",
                        400,
                        f"header {cost.header} must hold a non-negative integer",
                        errors=[
                            {"field": cost.header, "message": "must be a non-negative integer"}
                        ],
                    )
                amounts[cost.metric] = int(raw)
            else:
                amounts[cost.metric] = cost.constant
        key = headers.get("idempotency-key")
        return Admission(
            customer, route, amounts, estimates, key or None, response_costs, body_costs
        )

    def refusal(self, decision: Decision, now_s: float) -> Answer:
        """Build the problem+json answer for a refused decision, with its headers."""
        headers = ratelimit_fields(decision, now_s) if decision.assets else []
        if decision.retry_after is not None:
            headers.append(("retry-after", str(decision.retry_after)))
        if decision.status == 401:
            # RFC 9110 11.6.1: a 401 carries a challenge naming how to authenticate.
            headers.append(("www-authenticate", self.challenge()))
        usage = decision.assets.get(decision.metric or "")
        level = usage.level if usage else decision.level
        policy = usage.policy if usage else None
        if decision.refused_by is not None:  # the tier that refused, not the value's own
            level, policy = decision.refused_by
        return problem(
            decision.problem or "forbidden",
            decision.status,
            decision.detail,
            headers,
            customer=decision.customer or None,
            metric=decision.metric,
            level=level,
            policy=policy,
            retry_after=decision.retry_after,
        )

    def challenge(self) -> str:
        """Return the WWW-Authenticate challenge for the configured identity header."""
        if self.identity_header == "authorization":
            return 'Bearer realm="metergate"'
        # Not a registered scheme: it names the header that should carry the key.
        return f'ApiKey realm="metergate", header="{self.config.identity.header}"'

    def unavailable(self, retry_after: int = 1) -> Answer:
        """Build the 503 answer for storage that did not answer in time (closed mode)."""
        return problem(
            "metering-unavailable",
            503,
            "metering storage is unavailable; the request was not forwarded",
            [("retry-after", str(retry_after))],
            retry_after=retry_after,
        )

    @staticmethod
    def actuals(
        admission: Admission,
        response_headers: Mapping[str, str],
        found: Mapping[str, int] | None = None,
    ) -> dict[str, int]:
        """Read the actual units of response-priced metrics; without the header, the reserve.

        `found` holds the units read from the response body or trailers, per metric.
        """
        out: dict[str, int] = {}
        for metric, (header, reserve) in admission.response_costs.items():
            raw = response_headers.get(header, "").strip()
            out[metric] = int(raw) if re.fullmatch(r"\d{1,15}", raw) else reserve
        for metric, reserve in admission.body_costs.items():
            out[metric] = (found or {}).get(metric, reserve)
        return out

    def deferred(
        self,
        admission: Admission,
        response_headers: Mapping[str, str],
        operation: str,
        api_key: str | None = None,
        found: Mapping[str, int] | None = None,
        attempt: str = "",
    ) -> Deferred | None:
        """Describe what a request let through while storage was down should record later.

        Response-priced metrics count what the response said (or the reserve). UpDownCounter
        units are left out: the request is over by the time they could be recorded.
        """
        actuals = self.actuals(admission, response_headers, found)
        amounts = {**admission.amounts, **actuals}
        metrics = self.config.metrics
        amounts = {
            m: v
            for m, v in amounts.items()
            if m in metrics and metrics[m].type != "UpDownCounter" and v > 0
        }
        if not amounts:
            return None
        customer = admission.customer or None
        return Deferred(
            customer, None if customer else api_key, amounts, operation, attempt, actuals
        )


class KeyCache:
    """API key -> customer, remembered for `ttl_s` so most requests need no lookup (a minute:
    revocations are followed by their count, below, not by the entry's age; with thousands of
    customers, a short life would make most of the quieter ones' requests a lookup).

    An entry is trusted only while it carries the revocation count of `revocations` and for
    `CHECK_S` after the last lookup (which reads the count again): a key revoked by this process
    is refused at once, one revoked by another within about `CHECK_S`. Unknown keys are never
    remembered, so a key issued at runtime works at once."""

    def __init__(
        self, revocations: Revocations | None = None, ttl_s: float = 60.0, size: int = 100_000
    ) -> None:
        self.revocations = revocations or Revocations()
        self.ttl_s = ttl_s
        self.size = size
        self._entries: dict[str, tuple[str, float, int]] = {}
        self._checked = -math.inf

    def get(self, key: str, now: float) -> str | None:
        """Return the customer remembered for `key`, if still fresh at `now` (monotonic s)."""
        entry = self._entries.get(key)
        if (
            entry is not None
            and entry[1] > now
            and entry[2] == self.revocations.version
            and now - self._checked < CHECK_S
        ):
            return entry[0]
        return None

    def put(self, key: str, customer: str, now: float) -> None:
        """Remember `key`'s customer from `now` on, as just read from storage."""
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._checked = max(self._checked, now)
        self._entries[key] = (customer, now + self.ttl_s, self.revocations.version)
