"""The gateway configuration: validated, frozen models and the loader for YAML, JSON and TOML."""

from __future__ import annotations

import base64
import binascii
import contextlib
import difflib
import hashlib
import ipaddress
import itertools
import json
import os
import re
import tomllib
from collections.abc import Hashable, Mapping
from datetime import datetime
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
)
from pydantic_core import ErrorDetails

from metergate.core.bodies import JsonPointer
from metergate.core.names import name_problem

__all__ = [
    "LEVELS",
    "POLICIES",
    "AssetConfig",
    "BalanceConfig",
    "ConfigError",
    "CustomerConfig",
    "GatewayConfig",
    "hash_api_key",
    "load_config",
    "parse_config",
    "stored_api_key",
]

LEVELS: tuple[str, ...] = ("Normal", "Warning", "Critical", "OverUsage")
POLICIES: tuple[str, ...] = (
    "NotifyOnly",
    "AllowWithOverage",
    "AllowWithGrace",
    "RateLimit",
    "Deny",
    "SuspendUsage",
)
MAX_SAFE_INT = 2**53 - 1

Level = Literal["Normal", "Warning", "Critical", "OverUsage"]
Policy = Literal[
    "NotifyOnly", "AllowWithOverage", "AllowWithGrace", "RateLimit", "Deny", "SuspendUsage"
]
MetricType = Literal["CumulativeCounter", "TotalCounter", "Gauge", "UpDownCounter"]
PeriodName = Literal["day", "week", "month", "year"]
COUNTERS = ("CumulativeCounter", "TotalCounter")


class ConfigError(Exception):
    """The configuration is invalid; `errors` lists (path, message) pairs, one per problem."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None) -> None:
        self.errors = errors
        self.source = source
        count = f"{len(errors)} error{'' if len(errors) == 1 else 's'}"
        header = f"{source}: invalid ({count})" if source else f"invalid configuration ({count})"
        lines = [f"  {path}: {message}" if path else f"  {message}" for path, message in errors]
        super().__init__("\n".join([header, *lines]))


# Field checks: each raises ValueError with a plain message; pydantic puts it at the field's path.

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1000}


def _duration_ms(value: Any) -> int:
    """Read a duration (an integer of seconds, or `<int><unit>`) as integer milliseconds."""
    ms = None
    if isinstance(value, int) and not isinstance(value, bool):
        ms = value * 1000
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        ms = int(match.group(1)) * _UNIT_MS[match.group(2)]
    if ms is None:
        raise ValueError(f"must be a duration like 90, '90s', '1m' or '100ms', not {_show(value)}")
    if ms <= 0:
        raise ValueError("must be longer than 0")
    return ms


def _key_prefix(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise ValueError("may only contain letters, digits, '_', '.' and '-'")
    return value


_STORAGE_SCHEMES = ("memory", "redis", "rediss", "unix", "redis+cluster")


def _storage_url(value: str) -> str:
    # The URL may hold a password, so the message names the scheme only.
    scheme = value.partition("://")[0] if "://" in value else ""
    if scheme not in _STORAGE_SCHEMES:
        schemes = ", ".join(f"{s}://" for s in _STORAGE_SCHEMES)
        raise ValueError(f"unsupported scheme '{scheme}': use one of {schemes}")
    return value


def _http_url(value: str) -> str:
    if not re.match(r"https?://[^/\s]+", value):
        raise ValueError("must be an http:// or https:// URL")
    return value


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP network like '10.0.0.0/8'") from None


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone '{value}'") from None
    return value


_PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::path)?\}")


def _path_template(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must start with '/'")
    names: set[str] = set()
    for segment in value.split("/"):
        if "{" not in segment and "}" not in segment:
            continue
        match = _PARAMETER.fullmatch(segment)
        if match is None:
            raise ValueError(
                f"segment '{segment}' must be literal text, '{{name}}' or '{{name:path}}'"
            )
        if match.group(1) in names:
            raise ValueError(f"parameter '{match.group(1)}' appears twice")
        names.add(match.group(1))
    return value


def _webhook_secret(value: str) -> str:
    # Standard Webhooks: `whsec_` and the base64 of the key. Never echo the secret in a message.
    if not value.startswith("whsec_"):
        raise ValueError("must start with 'whsec_'")
    encoded = value.removeprefix("whsec_")
    try:
        # Padding may be left out, as the worker's signer allows.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError("must be 'whsec_' followed by base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"must encode 24 to 64 bytes, not {len(key)}")
    return value


def _name(value: str) -> str:
    problem = name_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _stored_key(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if value.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
        raise ValueError("starts with 'sha256:' but is not followed by 64 lowercase hex digits")
    return stored_api_key(value)


def _refund_status(value: int | str) -> int | str:
    if isinstance(value, int):
        if not 100 <= value <= 599:
            raise ValueError(f"{value} is not an HTTP status (100 to 599)")
        return value
    if not re.fullmatch(r"[1-5]xx", value):
        raise ValueError(f"{value!r} is neither a status nor a class like '5xx'")
    return value


DurationMs = Annotated[int, BeforeValidator(_duration_ms)]
"""A duration, given as seconds or `<int><unit>`, held as integer milliseconds (always > 0)."""

Amount = Annotated[StrictInt, Field(ge=0, le=MAX_SAFE_INT)]

Name = Annotated[str, AfterValidator(_name)]
"""A customer id, metric, plan or balance name: 1 to 200 characters, no control characters."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class StorageConfig(_Model):
    """Where counters, balances and the outbox live."""

    url: Annotated[str, AfterValidator(_storage_url)] = "memory://"
    """`memory://` (embedded), `redis://`, `rediss://` or `redis+cluster://host:port[,host:port]`."""
    prefix: Annotated[str, AfterValidator(_key_prefix)] = "mg"
    """Every key starts with this."""
    timeout_ms: Annotated[StrictInt, Field(gt=0)] = 100
    """Budget for one admission round trip."""
    on_failure: Literal["closed", "open"] = "closed"
    """closed: refuse with 503 while storage is unreachable; open: let requests through."""
    partitions: Annotated[StrictInt, Field(ge=1, le=16384)] = 64
    """Customers are hashed into this many partitions, each one slot with its own outbox."""
    eviction: Literal["refuse", "warn"] = "refuse"
    """A Redis whose maxmemory-policy may evict keys: refuse to use it, or warn and use it."""


class MetricConfig(_Model):
    """A product metric: how it aggregates and what it counts."""

    type: MetricType
    unit: str = "units"


class RateConfig(_Model):
    """A throttle: at most `limit` units per `per`, smoothed (GCRA with burst = limit)."""

    limit: Annotated[StrictInt, Field(gt=0, le=MAX_SAFE_INT)]
    per: DurationMs


class PriceConfig(_Model):
    """Credits charged within a tier: `per_unit` per `per` units, plus `base` once per period."""

    per_unit: Amount = 0
    per: Annotated[StrictInt, Field(gt=0, le=MAX_SAFE_INT)] = 1
    base: Amount = 0


class TierConfig(_Model):
    """A tier covers the units beyond its `from`; its policy applies to the units entering it."""

    from_: Amount = Field(alias="from")
    level: Level
    policy: Policy
    grace: Amount | None = None
    """AllowWithGrace: how many units past `from` are still allowed."""
    rate: RateConfig | None = None
    """RateLimit: the throttle while in this tier."""
    price: PriceConfig | None = None


class AssetConfig(_Model):
    """How a plan meters one metric: the period, the tiers and the balance priced usage draws."""

    period: PeriodName | None = None
    balance: str | None = None
    tiers: list[TierConfig] = Field(min_length=1)
    strict: bool = False
    """Decide every admission of this asset in storage, never from an allowance."""


class PlanConfig(_Model):
    """A plan: usage configuration per metric."""

    assets: dict[Name, AssetConfig]


class BalanceConfig(_Model):
    """A prepaid credit account in integer minor units of `unit`."""

    unit: str = "credits"
    amount: Amount = 0
    """Starting amount, written once when the balance does not exist yet."""
    overage: Amount = 0
    """How far below zero usage may draw the balance."""
    low_at: Amount | None = None
    """`balance.low` fires when `available` falls below this."""


class EntitlementConfig(_Model):
    """Which plan a customer is on, and the anchor and timezone of its periods."""

    plan: str
    anchor: datetime | None = None
    timezone: Annotated[str, AfterValidator(_timezone)] = "UTC"


class CustomerConfig(_Model):
    """A customer: API keys (kept hashed), the entitlement and named balances."""

    api_keys: list[Annotated[str, AfterValidator(_stored_key)]] = []
    """Plain keys are hashed on load; `sha256:<hex>` keys are kept as they are."""
    entitlement: EntitlementConfig
    balances: dict[Name, BalanceConfig] = {}


def _json_pointer(value: str) -> str:
    JsonPointer(value)  # raises ValueError naming what is wrong
    return value


Pointer = Annotated[str, AfterValidator(_json_pointer)]
"""An RFC 6901 JSON pointer: `/usage/total_tokens`."""


class RequestReserveConfig(_Model):
    """A reserve read from the request's JSON body (`/max_tokens`), or `default` without it."""

    request_json: Pointer
    default: Amount


class CostConfig(_Model):
    """Cost read from a request header, or from the response (header, JSON body, event stream,
    trailer) with a reserve held meanwhile."""

    header: str | None = None
    response_header: str | None = None
    response_json: Pointer | None = None
    """The JSON pointer of the units in a JSON body or in the last event of an event stream."""
    response_trailer: str | None = None
    reserve: Amount | RequestReserveConfig | None = None
    max_scan_bytes: Annotated[StrictInt, Field(gt=0, le=MAX_SAFE_INT)] | None = None
    """The most body bytes kept for reading a cost (default 1 MiB): larger bodies are not parsed."""


class MeterConfig(_Model):
    """One metric a route meters, and what a request costs in its units."""

    metric: str
    cost: Amount | CostConfig = 1


class RouteConfig(_Model):
    """A path template (`/v1/{rest:path}`) and methods, and what a matching request meters."""

    path: Annotated[str, AfterValidator(_path_template)]
    """Literal segments, `{name}` (one segment) and `{name:path}` (the rest, slashes included)."""
    methods: list[str] | None = None
    meter: list[MeterConfig] = []
    reserve_ttl: DurationMs = 300_000
    lease_ttl: DurationMs | None = None
    refund_on: list[Annotated[StrictInt | str, AfterValidator(_refund_status)]] = ["5xx"]
    """Response statuses whose admission is undone: integers (`502`) or classes (`"4xx"`)."""


class IdentityConfig(_Model):
    """Where the customer's API key is read from."""

    header: str = "Authorization"


class ProxyConfig(_Model):
    """The upstream of the standalone reverse proxy."""

    upstream: Annotated[str, AfterValidator(_http_url)] = "http://127.0.0.1:9000"
    timeout_s: Annotated[StrictInt, Field(gt=0)] = 30
    """Budget for the upstream's answer, waiting for an upstream connection included (504)."""
    header_timeout_s: Annotated[StrictInt, Field(gt=0)] = 10
    """A request head must be complete within this many seconds of its first byte."""
    body_timeout_s: Annotated[StrictInt, Field(gt=0)] = 30
    """Longest wait for the next chunk of a request body (408 and the connection closed)."""
    max_connections: Annotated[StrictInt, Field(gt=0)] = 1000
    """Upstream connections open at once, for all customers."""
    max_connections_per_customer: Annotated[StrictInt, Field(gt=0)] = 100
    """Upstream connections one customer (or one unmetered client address) may hold at once;
    its further requests wait for one of them within `timeout_s`, so nobody starves the rest."""
    max_body_bytes: Annotated[StrictInt, Field(gt=0)] = 10 * 1024 * 1024
    trusted_proxies: list[Annotated[str, AfterValidator(_network)]] = []
    """CIDRs whose `X-Forwarded-*` headers are kept, normalised (`10.0.0.1/8` is `10.0.0.0/8`)."""


class WebhookConfig(_Model):
    """A webhook endpoint, its Standard Webhooks secret and the event patterns it receives."""

    url: Annotated[str, AfterValidator(_http_url)]
    secret: Annotated[str, AfterValidator(_webhook_secret)]
    """`whsec_` followed by the base64 of 24 to 64 random bytes."""
    events: list[str] = ["*"]


STRIPE_API_VERSION = "2026-10-28.endive"
"""The Stripe API version metergate's requests are written against (sent as `Stripe-Version`)."""


class StripeMeterConfig(_Model):
    """A Stripe meter: its `event_name` and the payload keys it reads the customer and value from."""

    event_name: str = Field(min_length=1, max_length=100)
    customer_key: str = Field(default="stripe_customer_id", min_length=1, max_length=100)
    value_key: str = Field(default="value", min_length=1, max_length=100)


class StripeConfig(_Model):
    """Send `usage.reported` to Stripe as billing meter events."""

    api_key: str = Field(min_length=1)
    """A secret or restricted key (`sk_...`, `rk_...`); write `${STRIPE_API_KEY}`."""
    meters: dict[str, Annotated[str, Field(min_length=1, max_length=100)] | StripeMeterConfig]
    """metric -> the Stripe meter's `event_name`, or `{event_name, customer_key, value_key}`."""
    api_version: str = Field(default=STRIPE_API_VERSION, min_length=1, max_length=64)
    """The `Stripe-Version` every request pins."""
    customers: dict[str, str] = {}
    """metergate customer -> Stripe customer id (`cus_...`)."""
    value: Literal["quantity", "overage_quantity", "credits_charged"] = "quantity"
    """Which figure of `usage.reported` becomes `payload[value]`."""
    base_url: str = Field(default="https://api.stripe.com", pattern=r"^https?://")


class IdempotencyConfig(_Model):
    """How requests carrying `Idempotency-Key` are remembered and replayed."""

    ttl: DurationMs = 86_400_000
    """How long a completed request's response is replayed."""
    max_response_bytes: Annotated[StrictInt, Field(ge=0)] = 1024 * 1024
    """Responses with a larger body are not stored: a retry is forwarded and metered as new."""


class AllowancesConfig(_Model):
    """Per-process allowances taken from storage in advance (SPEC section 2, local allowances;
    the README's "Allowances" note)."""

    enabled: bool = False
    flush_ms: Annotated[StrictInt, Field(gt=0, le=3_600_000)] = 250
    """Used units are counted and charged at least this often."""
    max_units: Annotated[StrictInt, Field(gt=0, le=MAX_SAFE_INT)] = 1000
    """The most units one allowance holds."""
    ttl: DurationMs = 2000
    """An abandoned allowance returns to the quota after this."""


class AdminConfig(_Model):
    """The admin API."""

    token: str | None = Field(default=None, min_length=16)


class GatewayConfig(_Model):
    """The whole gateway configuration."""

    storage: StorageConfig = StorageConfig()
    metrics: dict[Name, MetricConfig] = {}
    plans: dict[Name, PlanConfig] = {}
    customers: dict[Name, CustomerConfig] = {}
    routes: list[RouteConfig] = []
    unmatched: Literal["pass", "deny"] = "pass"
    identity: IdentityConfig = IdentityConfig()
    proxy: ProxyConfig = ProxyConfig()
    webhooks: list[WebhookConfig] = []
    usage_report_interval: DurationMs = 60_000
    admin: AdminConfig = AdminConfig()
    stripe: StripeConfig | None = None
    idempotency: IdempotencyConfig = IdempotencyConfig()
    allowances: AllowancesConfig = AllowancesConfig()


def hash_api_key(key: str) -> str:
    """Return the stored form of a presented API key: `sha256:<hex>`, always hashed.

    A presented `sha256:<hex>` is hashed like any other key: the stored form is never a key, so
    whoever reads the config, a Redis dump or a backup cannot act as a customer.
    """
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def stored_api_key(value: str) -> str:
    """Return a configured key's stored form: `sha256:<hex>` is kept as written, plain keys hashed."""
    if re.fullmatch(r"sha256:[0-9a-f]{64}", value):
        return value
    return hash_api_key(value)


# Turning pydantic's errors into `path: message` in the words of the file the user wrote.


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Where(NamedTuple):
    path: str
    model: type[BaseModel] | None
    """The model the location's last key was looked up in (for 'did you mean')."""
    union_member: Literal["model", "value"] | None
    """Which member of a union (`cost: 1` or `cost: {...}`) the error came from, if any."""


def _bare(tp: Any) -> Any:
    """Strip `Annotated` and an optional `| None`; pydantic adds no location step for either."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif (
            get_origin(tp) in (Union, UnionType)
            and len(get_args(tp)) == 2
            and NoneType in get_args(tp)
        ):
            tp = next(a for a in get_args(tp) if a is not NoneType)
        else:
            return tp


def _locate(loc: tuple[int | str, ...], root: type[BaseModel]) -> _Where:
    """Render an error location as the user's path by walking the models it passes through.

    A union field's errors carry the member pydantic tried (`constrained-int`, `CostConfig`) as an
    extra step the user never wrote; only walking the types tells that step from a user's key.
    """
    path, model = "", None
    member: Literal["model", "value"] | None = None
    tp: Any = root
    for part in loc:
        tp = _bare(tp)
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            model = tp
            field = next(
                (f for n, f in tp.model_fields.items() if part in (n, f.alias)),
                None,
            )
            tp = field.annotation if field else None
        elif origin in (Union, UnionType):
            hit = next((m for m in get_args(tp) if getattr(m, "__name__", None) == part), None)
            member, tp = ("model", hit) if hit else ("value", None)
            continue
        elif origin is list:
            tp = get_args(tp)[0]
        elif origin is dict:
            tp = get_args(tp)[1]
        else:
            tp = None
        path += f"[{part}]" if origin is list else f".{part}" if path else str(part)
    return _Where(path, model, member)


_KIND = {
    "int": "an integer",
    "string": "a string",
    "bool": "true or false",
    "dict": "a mapping",
    "model": "a mapping",
    "list": "a list",
}


def _message(err: ErrorDetails, where: _Where) -> str:
    kind, value, ctx = err["type"], err["input"], err.get("ctx", {})
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        known = [f.alias or n for n, f in where.model.model_fields.items()] if where.model else []
        close = difflib.get_close_matches(key, known, n=1)
        return f"unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else "")
    if kind == "missing":
        return "is required"
    if kind.endswith("_type") and kind.removesuffix("_type") in _KIND:
        expected = _KIND[kind.removesuffix("_type")]
        if where.union_member == "value":
            expected += " or a mapping"
        return f"must be {expected}, not {_show(value)}"
    if kind in ("int_from_float", "int_parsing"):
        return f"must be an integer, not {_show(value)}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}, not {_show(value)}"
    if kind in ("greater_than", "greater_than_equal", "less_than_equal"):
        bound = {"greater_than": "greater than", "greater_than_equal": "at least"}
        limit = ctx.get("gt", ctx.get("ge", ctx.get("le")))
        return f"must be {bound.get(kind, 'at most')} {limit}, not {_show(value)}"
    if kind == "too_short":
        return "must not be empty" if ctx["min_length"] == 1 else err["msg"]
    if kind == "string_too_short":
        return f"must be at least {ctx['min_length']} characters long"  # never echo a secret
    if kind.startswith(("datetime", "date_")):
        return f"must be a date-time like '2026-01-15T00:00:00', not {_show(value)}"
    if kind == "value_error":
        return err["msg"].removeprefix("Value error, ")
    return err["msg"].replace("Input should be", "must be")


def _pydantic_errors(exc: ValidationError, root: type[BaseModel]) -> list[tuple[str, str]]:
    """List a ValidationError of `root` as (path, message) pairs, one per path, in plain words."""
    seen: dict[str, str] = {}
    for err in exc.errors():
        key_error = "[key]" in err["loc"]
        where = _locate(tuple(p for p in err["loc"] if p != "[key]"), root)
        if where.union_member == "value" and isinstance(err["input"], Mapping):
            continue  # a mapping was written: the mapping member's errors say what is wrong
        if where.union_member == "model" and err["type"] == "model_type":
            continue  # a scalar was written: the scalar member's errors say what is wrong
        if key_error and err["type"] == "value_error":
            message = f"the name {_show(err['input'])} {_message(err, where)}"
        elif key_error:
            message = f"the name {_show(err['input'])} must be a string (quote it)"
        else:
            message = _message(err, where)
        seen.setdefault(where.path, message)
    return list(seen.items())


def _check_tiers(cfg: GatewayConfig) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for pname, plan in cfg.plans.items():
        for mname, asset in plan.assets.items():
            base = f"plans.{pname}.assets.{mname}"
            metric = cfg.metrics.get(mname)
            if metric is None:
                errors.append((base, f"metric '{mname}' is not defined in metrics"))
            elif metric.type == "UpDownCounter" and asset.period is not None:
                errors.append((f"{base}.period", "an UpDownCounter is never reset by a period"))
            elif metric.type in COUNTERS and asset.period is None:
                errors.append((f"{base}.period", f"a {metric.type} needs a period"))
            tiers = asset.tiers
            if tiers[0].from_ != 0:
                errors.append((f"{base}.tiers[0].from", "the first tier must start at 0"))
            for i, tier in enumerate(tiers):
                at = f"{base}.tiers[{i}]"
                if i and tier.from_ <= tiers[i - 1].from_:
                    message = f"tiers must ascend: {tier.from_} is not above {tiers[i - 1].from_}"
                    errors.append((f"{at}.from", message))
                grace_wanted = tier.policy == "AllowWithGrace"
                if grace_wanted and tier.grace is None:
                    errors.append((f"{at}.grace", "AllowWithGrace needs a grace"))
                if not grace_wanted and tier.grace is not None:
                    errors.append((f"{at}.grace", "grace only applies to AllowWithGrace"))
                rate_wanted = tier.policy == "RateLimit"
                if rate_wanted and tier.rate is None:
                    errors.append((f"{at}.rate", "RateLimit needs a rate: {limit, per}"))
                if not rate_wanted and tier.rate is not None:
                    errors.append((f"{at}.rate", "rate only applies to RateLimit"))
                if tier.price is None or metric is None:
                    continue
                if metric.type not in COUNTERS:
                    errors.append(
                        (f"{at}.price", f"price is only valid on counters, not on a {metric.type}")
                    )
                elif asset.balance is None:
                    errors.append((f"{at}.price", "a priced tier needs the asset's balance"))
    return errors


def _check_customers(cfg: GatewayConfig) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    key_owner: dict[str, str] = {}
    for cname, customer in cfg.customers.items():
        base = f"customers.{cname}"
        for i, key in enumerate(customer.api_keys):
            owner = key_owner.setdefault(key, cname)
            if owner != cname:
                errors.append((f"{base}.api_keys[{i}]", f"customer '{owner}' has the same key"))
        plan = cfg.plans.get(customer.entitlement.plan)
        if plan is None:
            message = f"plan '{customer.entitlement.plan}' is not defined in plans"
            errors.append((f"{base}.entitlement.plan", message))
            continue
        drawn = dict.fromkeys(a.balance for a in plan.assets.values() if a.balance is not None)
        for bname in drawn:
            if bname not in customer.balances:
                message = f"plan '{customer.entitlement.plan}' draws balance '{bname}'"
                errors.append((f"{base}.balances", f"{message}, which is missing"))
    return errors


def _check_routes(cfg: GatewayConfig) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for i, route in enumerate(cfg.routes):
        metered: set[str] = set()
        for j, meter in enumerate(route.meter):
            at = f"routes[{i}].meter[{j}]"
            if meter.metric not in cfg.metrics:
                message = f"metric '{meter.metric}' is not defined in metrics"
                errors.append((f"{at}.metric", message))
            elif meter.metric in metered:
                errors.append((f"{at}.metric", f"metric '{meter.metric}' is metered twice"))
            metered.add(meter.metric)
            cost = meter.cost
            if not isinstance(cost, CostConfig):
                continue
            errors.extend(_check_cost(cost, f"{at}.cost"))
    return errors


_COST_SOURCES = ("header", "response_header", "response_json", "response_trailer")


def _check_cost(cost: CostConfig, at: str) -> list[tuple[str, str]]:
    given = [name for name in _COST_SOURCES if getattr(cost, name) is not None]
    if len(given) != 1:
        return [(at, "give exactly one of " + ", ".join(_COST_SOURCES))]
    source = given[0]
    if source != "header" and cost.reserve is None:
        return [(f"{at}.reserve", f"{source} needs a reserve")]
    if source == "header" and cost.reserve is not None:
        return [(f"{at}.reserve", "reserve only applies to costs read from the response")]
    reads_body = source == "response_json" or isinstance(cost.reserve, RequestReserveConfig)
    if cost.max_scan_bytes is not None and not reads_body:
        message = "max_scan_bytes only applies to response_json or a request_json reserve"
        return [(f"{at}.max_scan_bytes", message)]
    return []


def _cross_check(cfg: GatewayConfig) -> list[tuple[str, str]]:
    """Check what no single field can: references between sections and rules across fields."""
    return _check_tiers(cfg) + _check_customers(cfg) + _check_routes(cfg) + _check_stripe(cfg)


def _check_stripe(cfg: GatewayConfig) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    if cfg.usage_report_interval % 1000:
        errors.append(("usage_report_interval", "must be a whole number of seconds"))
    if cfg.stripe is None:
        return errors
    for metric in cfg.stripe.meters:
        spec = cfg.metrics.get(metric)
        if spec is None:
            errors.append(
                (f"stripe.meters.{metric}", f"metric '{metric}' is not defined in metrics")
            )
        elif spec.type not in ("CumulativeCounter", "TotalCounter"):
            errors.append(
                (f"stripe.meters.{metric}", f"usage is reported for counters only, not {spec.type}")
            )
    return errors


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(
    node: Any, loc: tuple[int | str, ...], env: Mapping[str, str], errors: list[tuple[str, str]]
) -> Any:
    if isinstance(node, str):
        if "${" not in node:
            return node  # most strings name no variable: no substitution to try

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
                errors.append((path.lstrip("."), f"environment variable {name} is not set"))
                return ""
            return env[name]

        return _ENV.sub(sub, node)
    if isinstance(node, dict):
        return {k: _expand_env(v, (*loc, str(k)), env, errors) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, (*loc, i), env, errors) for i, v in enumerate(node)]
    return node


def parse_config(data: Mapping[str, Any], *, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Validate a configuration mapping (after `${ENV}` expansion) into a GatewayConfig."""
    env_errors: list[tuple[str, str]] = []
    expanded = _expand_env(dict(data), (), os.environ if env is None else env, env_errors)
    try:
        cfg = GatewayConfig.model_validate(expanded)
    except ValidationError as exc:
        # A missing variable became "": its field's own complaint would only repeat the problem.
        reported = {path for path, _ in env_errors}
        errors = [e for e in _pydantic_errors(exc, GatewayConfig) if e[0] not in reported]
        raise ConfigError(env_errors + errors) from None
    errors = env_errors or _cross_check(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


_STR_TAG = "tag:yaml.org,2002:str"


class _UniqueKeys(yaml.constructor.SafeConstructor):
    """Refuses a key given twice in one mapping (PyYAML keeps the last), for either parser."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.tag == _STR_TAG and isinstance(key_node, yaml.ScalarNode):
                key: Any = key_node.value  # what constructing it gives, without the call
            else:
                key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # PyYAML refuses it below ("found unhashable key")
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


class _UniqueKeyLoader(_UniqueKeys, yaml.SafeLoader):
    """The pure-Python safe YAML loader, refusing duplicate keys."""


MAX_DOCUMENT_BYTES = 10 * 1024 * 1024
"""A config file, and the document its YAML aliases expand to, may not pass 10 MB."""
MAX_ALIAS_NODES = 10_000
"""One YAML alias may not stand for more than this many nodes."""


def _expanded(node: yaml.Node, memo: dict[int, tuple[int, int]], path: set[int]) -> tuple[int, int]:
    """Return (nodes, bytes) of a YAML node with every alias expanded; memoized per node."""
    known = memo.get(id(node))
    if known is not None:
        return known
    if id(node) in path:
        raise _alias_error("an alias refers to a node that contains it", node)
    if isinstance(node, yaml.ScalarNode):
        size = (1, len(node.value) + 1)
    else:
        path.add(id(node))
        children = node.value if isinstance(node, yaml.SequenceNode) else _flat(node.value)
        nodes, length = 1, 2
        for child in children:
            n, b = _expanded(child, memo, path)
            nodes, length = nodes + n, length + b
            if length > MAX_DOCUMENT_BYTES:
                break  # over the limit already: the callers say so
        path.discard(id(node))
        size = (nodes, length)
    memo[id(node)] = size
    return size


def _flat(pairs: list[tuple[yaml.Node, yaml.Node]]) -> list[yaml.Node]:
    return [n for pair in pairs for n in pair]


def _alias_error(problem: str, node: yaml.Node) -> yaml.MarkedYAMLError:
    return yaml.composer.ComposerError(None, None, problem, node.start_mark)


class _LimitedLoader(_UniqueKeyLoader):
    """The unique-key loader, refusing aliases that expand past the limits ("billion laughs")."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor  # type: ignore[no-untyped-call]
            if anchor in self.anchors:
                node = self.anchors[anchor]
                # one memo for the whole file: each node is sized once, however often aliased
                memo: dict[int, tuple[int, int]] = self.__dict__.setdefault("_sizes", {})
                nodes, length = _expanded(node, memo, set())
                if nodes > MAX_ALIAS_NODES or length > MAX_DOCUMENT_BYTES:
                    raise _alias_error(
                        f"the alias *{anchor} expands to more than {MAX_ALIAS_NODES} nodes "
                        f"or {MAX_DOCUMENT_BYTES // 2**20} MB",
                        node,
                    )
        return super().compose_node(parent, index)

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None and _expanded(node, {}, set())[1] > MAX_DOCUMENT_BYTES:
            raise _alias_error(
                f"the document expands to more than {MAX_DOCUMENT_BYTES // 2**20} MB "
                "through its aliases",
                node,
            )
        return node


# libyaml (PyYAML's C parser) composes about ten times as fast as the pure-Python parser, but its
# composer gives no hook at each alias. So a document is composed in C, and the composed graph is
# checked for what `_LimitedLoader` checks while composing: no alias expands past the limits,
# nor the whole document. A document that fails any check, or fails to load at all, is loaded
# again by `_LimitedLoader`, whose answer (the data, or the error in its words) is then the
# answer: both loaders refuse the same files with the same messages.

_FAST_MAX_DEPTH = 64
"""Documents nested deeper than this are left to the pure loader (which may refuse them)."""


class _Fallback(Exception):
    """The composed document needs the pure loader's verdict."""


def _check_composed(root: yaml.Node) -> None:
    """Raise _Fallback unless every alias and the whole document are within the limits, and the
    document is at most _FAST_MAX_DEPTH deep (nesting the pure loader also accepts)."""
    # One pass level by level; a node met twice is an alias's. Without aliases, the document's
    # expanded size is the plain sum, so only documents with aliases need `_expanded`.
    seen: set[int] = set()
    aliased: list[yaml.Node] = []
    size = 0
    level: list[yaml.Node] = [root]
    for _depth in range(_FAST_MAX_DEPTH):
        below: list[yaml.Node] = []
        for node in level:
            if id(node) in seen:
                aliased.append(node)
                continue
            seen.add(id(node))
            value = node.value
            if isinstance(value, str):
                size += len(value) + 1
            elif isinstance(node, yaml.SequenceNode):
                size += 2
                below.extend(value)
            else:
                size += 2
                below.extend(itertools.chain.from_iterable(value))
        if not below:
            break
        level = below
    else:
        raise _Fallback  # deeper than _FAST_MAX_DEPTH
    if not aliased:
        if size > MAX_DOCUMENT_BYTES:
            raise _Fallback
        return
    memo: dict[int, tuple[int, int]] = {}
    for node in aliased:
        nodes, length = _expanded(node, memo, set())
        if nodes > MAX_ALIAS_NODES or length > MAX_DOCUMENT_BYTES:
            raise _Fallback
    if _expanded(root, {}, set())[1] > MAX_DOCUMENT_BYTES:
        raise _Fallback


def _caps_nesting(loader: type[Any]) -> bool:
    """Whether the C parser refuses absurd nesting itself (libyaml 0.2.5 and later stop at 1000
    levels), as its composer recurses in C: without that cap, a deep document could overflow the
    stack instead of raising."""
    try:
        yaml.compose("[" * 2000 + "]" * 2000, Loader=loader)
    except yaml.YAMLError:
        return True
    return False


_CSafeLoader: type[Any] | None = getattr(yaml, "CSafeLoader", None)
_CLoader: type[Any] | None = None
if _CSafeLoader is not None and _caps_nesting(_CSafeLoader):

    class _CUniqueKeyLoader(_UniqueKeys, _CSafeLoader):  # type: ignore[misc, valid-type]
        """libyaml's safe loader, refusing duplicate keys and checking the composed document."""

        def resolve(self, kind: type[yaml.Node], value: Any, implicit: Any) -> str:
            # A scalar's tag depends on its text and how it was written only: a config repeats
            # the same keys and values for each customer, so each is resolved once.
            if kind is not yaml.ScalarNode:
                return super().resolve(kind, value, implicit)  # type: ignore[no-any-return]
            tags: dict[tuple[str, Any], str] = self.__dict__.setdefault("_tags", {})
            tag = tags.get((value, implicit))
            if tag is None:
                tag = tags[value, implicit] = super().resolve(kind, value, implicit)
            return tag

        def get_single_node(self) -> yaml.Node | None:
            node: yaml.Node | None = super().get_single_node()
            if node is not None:
                _check_composed(node)
            return node

    _CLoader = _CUniqueKeyLoader


def _load_yaml(text: str) -> Any:
    """Load a YAML document: with libyaml when present and the document passes its checks, and
    otherwise (or when it fails) with the pure-Python `_LimitedLoader`, which decides."""
    if _CLoader is not None:
        with contextlib.suppress(Exception):  # any failure: the pure loader gives the answer
            return yaml.load(text, Loader=_CLoader)
    return yaml.load(text, Loader=_LimitedLoader)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse(text: str, suffix: str) -> Any:
    """Parse the text of a YAML, JSON or TOML file; raise ValueError with a one-line reason."""
    try:
        if suffix == ".json":
            return json.loads(text, object_pairs_hook=_unique_keys)
        if suffix == ".toml":
            return tomllib.loads(text)
        return _load_yaml(text)
    except RecursionError:
        raise ValueError("the document is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ValueError(f"{where}{exc.problem or exc}") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ValueError(str(exc)) from None


def load_config(
    path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Read and validate a configuration file (YAML, JSON or TOML, by extension)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([("", f"cannot read the file: {exc.strerror}")], source) from None
    except UnicodeDecodeError:
        raise ConfigError([("", "cannot read the file: it is not UTF-8 text")], source) from None
    if len(text) > MAX_DOCUMENT_BYTES:
        message = f"the file is larger than {MAX_DOCUMENT_BYTES // 2**20} MB"
        raise ConfigError([("", message)], source)
    try:
        data = _parse(text, Path(path).suffix.lower())
    except ValueError as exc:
        raise ConfigError([("", f"cannot parse the file: {exc}")], source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([("", "the top level must be a mapping")], source)
    try:
        return parse_config(data, env=env)
    except ConfigError as exc:
        raise ConfigError(exc.errors, source) from None
