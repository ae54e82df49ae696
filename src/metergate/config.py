"""The gateway configuration: validated, frozen models and the loader for YAML, JSON and TOML."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, ValidationError

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
Policy = Literal["NotifyOnly", "AllowWithOverage", "AllowWithGrace", "RateLimit", "Deny", "SuspendUsage"]
MetricType = Literal["CumulativeCounter", "TotalCounter", "Gauge", "UpDownCounter"]
PeriodName = Literal["day", "week", "month", "year"]


class ConfigError(Exception):
    """The configuration is invalid; `errors` lists (path, message) pairs, one per problem."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None) -> None:
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        lines = [f"{path}: {message}" if path else message for path, message in errors]
        super().__init__(where + "invalid configuration\n  " + "\n  ".join(lines))


_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1000}


def _duration_ms(value: Any) -> int:
    """Read a duration (an integer of seconds, or `<int><unit>`) as integer milliseconds."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError("must be an integer of seconds or a string like '90s', '1m', '100ms'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value * 1000
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return int(match.group(1)) * _UNIT_MS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration: use seconds or '<int><ms|s|m|h|d>'")


DurationMs = Annotated[int, BeforeValidator(_duration_ms)]
"""A duration, given as seconds or `<int><unit>`, held as integer milliseconds."""

Amount = Annotated[StrictInt, Field(ge=0, le=MAX_SAFE_INT)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class StorageConfig(_Model):
    """Where counters, balances and the outbox live."""

    url: str = "memory://"
    """`memory://` (embedded), `redis://`, `rediss://` or `redis+cluster://host:port[,host:port]`."""
    prefix: str = Field("mg", pattern=r"^[A-Za-z0-9_.-]+$")
    """Every key starts with this."""
    timeout_ms: Annotated[StrictInt, Field(gt=0)] = 100
    """Budget for one admission round trip."""
    on_failure: Literal["closed", "open"] = "closed"
    """closed: refuse with 503 while storage is unreachable; open: let requests through."""
    partitions: Annotated[StrictInt, Field(ge=1, le=16384)] = 64
    """Customers are hashed into this many partitions, each one slot with its own outbox."""


class MetricConfig(_Model):
    """A product metric: how it aggregates and what it counts."""

    type: MetricType
    unit: str = "units"


class RateConfig(_Model):
    """A throttle: at most `limit` units per `per`, smoothed (GCRA with burst = limit)."""

    limit: Annotated[StrictInt, Field(gt=0, le=MAX_SAFE_INT)]
    per: DurationMs


class PriceConfig(_Model):
    """Credits charged per unit within a tier: `per_unit` per `per` units, plus `base` once per period."""

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


class PlanConfig(_Model):
    """A plan: usage configuration per metric."""

    assets: dict[str, AssetConfig]


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
    timezone: str = "UTC"


def _hash_keys(value: Any) -> Any:
    if isinstance(value, list):
        return [hash_api_key(k) if isinstance(k, str) else k for k in value]
    return value


class CustomerConfig(_Model):
    """A customer: API keys (kept hashed), the entitlement and named balances."""

    api_keys: Annotated[list[str], BeforeValidator(_hash_keys)] = []
    entitlement: EntitlementConfig
    balances: dict[str, BalanceConfig] = {}


class CostConfig(_Model):
    """A cost read from a request header, or from a response header with a reserve held meanwhile."""

    header: str | None = None
    response_header: str | None = None
    reserve: Amount | None = None


class MeterConfig(_Model):
    """One metric a route meters, and what a request costs in its units."""

    metric: str
    cost: Amount | CostConfig = 1


class RouteConfig(_Model):
    """A path template (`/v1/{rest:path}`) and methods, and what a matching request meters."""

    path: str = Field(pattern=r"^/")
    methods: list[str] | None = None
    meter: list[MeterConfig] = []
    reserve_ttl: DurationMs = 300_000
    lease_ttl: DurationMs | None = None


class IdentityConfig(_Model):
    """Where the customer's API key is read from."""

    header: str = "Authorization"


class ProxyConfig(_Model):
    """The upstream of the standalone reverse proxy."""

    upstream: str = "http://127.0.0.1:9000"
    timeout_s: Annotated[StrictInt, Field(gt=0)] = 30
    max_body_bytes: Annotated[StrictInt, Field(gt=0)] = 10 * 1024 * 1024
    trusted_proxies: list[str] = []


class WebhookConfig(_Model):
    """A webhook endpoint, its Standard Webhooks secret and the event patterns it receives."""

    url: str
    secret: str = Field(pattern=r"^whsec_[A-Za-z0-9+/=]+$")
    events: list[str] = ["*"]


class AdminConfig(_Model):
    """The admin API."""

    token: str | None = Field(None, min_length=16)


class GatewayConfig(_Model):
    """The whole gateway configuration."""

    storage: StorageConfig = StorageConfig()
    metrics: dict[str, MetricConfig] = {}
    plans: dict[str, PlanConfig] = {}
    customers: dict[str, CustomerConfig] = {}
    routes: list[RouteConfig] = []
    unmatched: Literal["pass", "deny"] = "pass"
    identity: IdentityConfig = IdentityConfig()
    proxy: ProxyConfig = ProxyConfig()
    webhooks: list[WebhookConfig] = []
    usage_report_interval: DurationMs = 60_000
    admin: AdminConfig = AdminConfig()


def hash_api_key(key: str) -> str:
    """Return the stored form of an API key: `sha256:<hex>` (already-hashed keys pass unchanged)."""
    if re.fullmatch(r"sha256:[0-9a-f]{64}", key):
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(
    node: Any, loc: tuple[int | str, ...], env: Mapping[str, str], errors: list[tuple[str, str]]
) -> Any:
    if isinstance(node, str):

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                errors.append((_path(loc), f"environment variable {name} is not set"))
                return ""
            return env[name]

        return _ENV.sub(sub, node)
    if isinstance(node, dict):
        return {k: _expand_env(v, (*loc, str(k)), env, errors) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, (*loc, i), env, errors) for i, v in enumerate(node)]
    return node


# pydantic adds the union member it tried (`int`, `CostConfig`) to locations; users never wrote those.
_UNION_TAGS = {"int", "constrained-int", "CostConfig", "function-before[_duration_ms(), int]"}


def _pydantic_errors(exc: ValidationError) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p not in _UNION_TAGS)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = f"unknown key '{loc[-1]}'"
        elif err["type"] == "missing":
            message = "is required"
        seen.setdefault(_path(loc), message)
    return list(seen.items())


def _cross_check(cfg: GatewayConfig) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for pname, plan in cfg.plans.items():
        for mname, asset in plan.assets.items():
            base = f"plans.{pname}.assets.{mname}"
            metric = cfg.metrics.get(mname)
            if metric is None:
                errors.append((base, f"metric '{mname}' is not defined in metrics"))
            tiers = asset.tiers
            if tiers[0].from_ != 0:
                errors.append((f"{base}.tiers[0].from", "the first tier must start at 0"))
            for i, tier in enumerate(tiers):
                at = f"{base}.tiers[{i}]"
                if i and tier.from_ <= tiers[i - 1].from_:
                    errors.append(
                        (f"{at}.from", f"tiers must ascend: {tier.from_} is not above the previous")
                    )
                if tier.policy == "AllowWithGrace" and tier.grace is None:
                    errors.append((f"{at}.grace", "AllowWithGrace needs a grace"))
                if tier.policy != "AllowWithGrace" and tier.grace is not None:
                    errors.append((f"{at}.grace", f"grace only applies to AllowWithGrace"))
                if tier.policy == "RateLimit" and tier.rate is None:
                    errors.append((f"{at}.rate", "RateLimit needs a rate: {limit, per}"))
                if tier.policy != "RateLimit" and tier.rate is not None:
                    errors.append((f"{at}.rate", "rate only applies to RateLimit"))
                if tier.rate is not None and tier.rate.per <= 0:
                    errors.append((f"{at}.rate.per", "must be longer than 0"))
                if tier.price is not None and metric is not None:
                    if metric.type not in ("CumulativeCounter", "TotalCounter"):
                        errors.append(
                            (f"{at}.price", f"price is only valid on counters, not {metric.type}")
                        )
                    elif asset.balance is None:
                        errors.append((f"{at}.price", "a priced tier needs the asset's balance"))
            if metric is not None:
                if metric.type == "UpDownCounter" and asset.period is not None:
                    errors.append((f"{base}.period", "an UpDownCounter is never reset by a period"))
                if metric.type in ("CumulativeCounter", "TotalCounter") and asset.period is None:
                    errors.append((f"{base}.period", f"a {metric.type} needs a period"))
    balances_used = {
        (pname, asset.balance)
        for pname, plan in cfg.plans.items()
        for asset in plan.assets.values()
        if asset.balance
    }
    for cname, customer in cfg.customers.items():
        ent = customer.entitlement
        base = f"customers.{cname}"
        if ent.plan not in cfg.plans:
            errors.append((f"{base}.entitlement.plan", f"plan '{ent.plan}' is not defined in plans"))
        try:
            ZoneInfo(ent.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            errors.append((f"{base}.entitlement.timezone", f"unknown timezone '{ent.timezone}'"))
        for pname, bname in balances_used:
            if pname == ent.plan and bname not in customer.balances:
                errors.append(
                    (f"{base}.balances", f"plan '{pname}' draws balance '{bname}', which is missing")
                )
    for i, route in enumerate(cfg.routes):
        for j, meter in enumerate(route.meter):
            at = f"routes[{i}].meter[{j}]"
            if meter.metric not in cfg.metrics:
                errors.append((f"{at}.metric", f"metric '{meter.metric}' is not defined in metrics"))
            cost = meter.cost
            if isinstance(cost, CostConfig):
                if (cost.header is None) == (cost.response_header is None):
                    errors.append((f"{at}.cost", "give exactly one of header or response_header"))
                if cost.response_header is not None and cost.reserve is None:
                    errors.append((f"{at}.cost.reserve", "response_header needs a reserve"))
                if cost.header is not None and cost.reserve is not None:
                    errors.append((f"{at}.cost.reserve", "reserve only applies to response_header"))
    return errors


def parse_config(data: Mapping[str, Any], *, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Validate a configuration mapping (after `${ENV}` expansion) into a GatewayConfig."""
    errors: list[tuple[str, str]] = []
    expanded = _expand_env(dict(data), (), os.environ if env is None else env, errors)
    if errors:
        raise ConfigError(errors)
    try:
        cfg = GatewayConfig.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(_pydantic_errors(exc)) from None
    errors = _cross_check(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate a configuration file (YAML, JSON or TOML, by extension)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([("", f"cannot read the file: {exc.strerror}")], source) from None
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError([("", f"cannot parse the file: {exc}")], source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([("", "the top level must be a mapping")], source)
    try:
        return parse_config(data, env=env)
    except ConfigError as exc:
        raise ConfigError(exc.errors, source) from None
