"""Every metering operation as a sans-I/O flow: a generator yielding storage calls, getting replies.

`Meter` and `AsyncMeter` drive these flows with a three-line sync or async loop (the model is
httpx's `Auth.auth_flow`), so the logic exists once and never touches a socket.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from metergate.config import (
    LEVELS,
    MAX_SAFE_INT,
    BalanceConfig,
    CustomerConfig,
    GatewayConfig,
    hash_api_key,
)
from metergate.core import wire
from metergate.core.errors import Conflict, InvalidAmount, NotFound, StorageUnavailable
from metergate.core.ids import new_ulid
from metergate.core.keys import Keys
from metergate.core.model import AssetUsage, BalanceState, Decision, Throttle, Ticket
from metergate.core.names import check_name
from metergate.core.plans import CompiledAsset, compile_plans
from metergate.core.revocations import Revocations
from metergate.periods import period_window

__all__ = [
    "ALREADY_APPLIED",
    "LOST_DATA",
    "Batch",
    "Command",
    "Entitlement",
    "Flow",
    "MeterCore",
    "Script",
    "check_amount",
]

T = TypeVar("T")
logger = logging.getLogger("metergate")

LOST_DATA = "storage lost its data; restore it (AOF) before serving"


@dataclass(frozen=True, slots=True)
class Script:
    """Run one of the Lua scripts with its keys and arguments."""

    name: str
    keys: tuple[str, ...]
    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Command:
    """Run one plain Redis command (reads, and the writes outside any customer's slot)."""

    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Batch:
    """Run plain commands pipelined, without a transaction (on any slots); replies in order."""

    commands: tuple[tuple[str, ...], ...]


Flow = Generator[Script | Command | Batch, Any, T]

_BOOT_FORMAT = 1  # the version of what a customer's start-up digest covers
_CHUNK = 1000  # members or field pairs per command when a start writes many at once
KEYED_OP_TTL_S = 86_400
AUTO_OP_TTL_S = 600
LEDGER_LIMIT = 10_000
ALREADY_APPLIED = "this attempt was already applied"


def check_amount(value: object, field: str, *, signed: bool = False, positive: bool = False) -> int:
    """Return `value` if it is a safe integer (of the right sign); raise InvalidAmount otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidAmount(field, f"must be an integer, not {value!r}")
    if abs(value) > MAX_SAFE_INT:
        raise InvalidAmount(field, f"{value} is beyond the safe range of +/-(2^53 - 1)")
    if not signed and value < 0:
        raise InvalidAmount(field, f"must not be negative, got {value}")
    if positive and value <= 0:
        raise InvalidAmount(field, f"must be greater than 0, got {value}")
    return value


def _check_name(value: object, field: str) -> str:
    # the one rule of names, shared with the config loader and the admin API
    return check_name(value, field)


def _iso(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


@dataclass(slots=True)
class _Shape:
    """What every admission of one set of metrics by one customer on one plan sends alike.

    Built once per customer, plan and metric set, so an admission only formats what changes:
    the time, the operation and hold ids, the period and the usage window.
    """

    assets: list[CompiledAsset]
    balances: list[str]
    head: tuple[str, ...]  # operation record (without an id), outbox, customer hash, ledger
    asset_keys: tuple[str, ...]  # per asset: state hash, expiry zset; then per balance the same
    asset_args: list[
        tuple[tuple[str, str], tuple[str, ...]]
    ]  # (metric, kind), (bi, nt, flags, tiers)
    tail: tuple[str, ...]  # open usage windows, closing, holds index
    partition: int
    counts: tuple[str, ...]  # asset count, balance count, balance names
    leases: frozenset[str]  # the UpDownCounter metrics, whose admissions take a lease
    window: tuple[int, str, tuple[str, ...]] = (-1, "", ())  # usage window: start, key, args


@dataclass(slots=True)
class Entitlement:
    """A customer's plan in effect, its period anchor and timezone, and the stored version."""

    plan: str
    anchor: datetime | None
    timezone: str
    version: str
    windows: dict[str, tuple[int, int, tuple[str, ...]]] = field(default_factory=dict)
    shapes: dict[tuple[str, tuple[str, ...]], _Shape] = field(default_factory=dict)

    def window(self, period: str, now_s: float) -> tuple[int, int, tuple[str, ...]]:
        """Return the start and end (epoch s) of the period containing `now_s`, and the script
        arguments naming it: start and end in epoch ms, then in RFC 3339."""
        cached = self.windows.get(period)
        if cached is not None and cached[0] <= now_s < cached[1]:
            return cached
        start, end = period_window(period, now_s, anchor=self.anchor, timezone=self.timezone)  # type: ignore[arg-type]
        args = (str(start * 1000), str(end * 1000), _iso(start), _iso(end))
        window = (start, end, args)
        self.windows[period] = window
        return window


def _encode_rid(customer: str, balance: str, nonce: str | None = None) -> str:
    raw = json.dumps([customer, balance, nonce or uuid.uuid4().hex[:16]], separators=(",", ":"))
    return "rsv_" + base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_rid(rid: str) -> tuple[str, str]:
    try:
        body = rid.removeprefix("rsv_")
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        customer, balance, _ = json.loads(raw)
        return str(customer), str(balance)
    except (ValueError, binascii.Error, TypeError) as exc:
        raise NotFound(f"reservation {rid!r} does not exist") from exc


_PROBLEM_DETAIL = {
    "asset-suspended": "usage of '{metric}' is suspended",
    "quota-exceeded": "'{metric}' has reached its limit for this period",
    "rate-limited": "'{metric}' is throttled; retry after the given delay",
    "insufficient-credits": "the balance cannot cover the price of this request",
    "balance-suspended": "the balance to charge is suspended",
    "idempotency-conflict": "this idempotency key was used with different parameters",
}


class MeterCore:
    """All metering logic over one configuration; every public method returns a Flow."""

    def __init__(self, config: GatewayConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.keys = Keys(config.storage.prefix, config.storage.partitions)
        self.revocations = Revocations()
        self.plans: dict[str, dict[str, CompiledAsset]] = compile_plans(config)
        self._entitlements: dict[str, Entitlement] = {}
        self._bootstrapped = False
        self._generations: dict[str, str] = {}  # sentinel key -> the value seen at bootstrap
        self._lost: set[str] = set()  # sentinel keys missing at bootstrap while others were there
        self.deployment = ""  # this deployment's id, read (or chosen) at bootstrap
        # Hold ids of admissions without an idempotency key: unique per process by a random
        # prefix, then a counter (a uuid4 per admission costs a system call).
        self._ids_prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        default_lease_s = config.proxy.timeout_s + 60
        self.default_lease_ms = default_lease_s * 1000

    # -- customers -------------------------------------------------------------------------

    @property
    def bootstrapped(self) -> bool:
        """Whether the configured customers have been loaded into storage by this core."""
        return self._bootstrapped

    def forget(self, customer: str) -> None:
        """Drop the cached entitlement of a customer; the next operation reads it afresh."""
        self._entitlements.pop(customer, None)

    # Data-loss sentinels. Redis restarted without its data (no AOF, a replica that re-synced from
    # an empty primary) looks like a fresh Redis: every balance would be missing, and a gateway
    # would answer 401 for every customer, or re-create configured balances at their starting
    # amount. So each partition's slot (and the API keys' slot) holds a sentinel key, written
    # once the configured customers are loaded, whose value (a random generation) every process
    # remembers at its bootstrap. A process that then finds a customer or balance missing reads
    # the sentinel of that slot: gone, or another generation (the store was emptied and loaded
    # afresh by a newer process), means the data is gone, and it raises StorageUnavailable
    # instead of answering from an empty store.

    def sentinel(self, partition: int | None) -> str:
        """Return the sentinel key of a partition's slot (None: of the API keys' slot)."""
        if partition is None:
            # `{mg:api-keys}` hashes like the key `mg:api-keys` itself: the same slot.
            return f"{{{self.keys.api_keys}}}:sentinel"
        return f"{self.keys.outbox(partition).removesuffix(':outbox')}:sentinel"

    def _sentinels(self) -> list[str]:
        return [self.sentinel(None), *(self.sentinel(p) for p in range(self.keys.partitions))]

    def require_data(self, key: str) -> Flow[None]:
        """Raise StorageUnavailable when the sentinel `key` is gone or was written anew."""
        if not self._bootstrapped:
            return
        value = yield Command(("GET", key))
        if value is None or value != self._generations.get(key, value):
            raise StorageUnavailable(f"{LOST_DATA} (the sentinel key {key} is gone or new)")

    def bootstrap(self) -> Flow[None]:
        """Load the configured customers into storage without overwriting runtime changes."""
        if self._bootstrapped:
            return
        sentinels = self._sentinels()
        values = yield Batch(tuple(("GET", key) for key in sentinels))
        found = {key: v for key, v in zip(sentinels, values, strict=True) if v is not None}
        missing = {key for key in sentinels if key not in found}
        changed = any(self._generations.get(key, v) != v for key, v in found.items())
        if changed or (self._generations and missing - self._lost):
            # a bootstrap that failed half-way is retried, and the data went away meanwhile
            raise StorageUnavailable(f"{LOST_DATA} (sentinel keys are gone or new)")
        lost = missing if found else set()
        self._lost = lost
        if lost:
            # Some slots were bootstrapped and others lost their data (a Cluster node restarted
            # empty), or a first bootstrap elsewhere is half-way. Write nothing there.
            logger.error(
                "metergate: %s: %d of %d slots have no sentinel (%s); customers there are "
                "refused with 503 until the data is restored (or the sentinel is set again)",
                LOST_DATA,
                len(lost),
                len(sentinels),
                ", ".join(sorted(lost)[:5]) + (", ..." if len(lost) > 5 else ""),
            )
        self._generations.update(found)
        yield from self._load_deployment()
        yield from self._load_customers(lost)
        fresh = sorted(missing - lost)
        if fresh:
            # Written last, so that a bootstrap dying half-way leaves no sentinel on a fresh
            # store; NX, and read back, as another process may be bootstrapping at once.
            generation = f"{uuid.uuid4().hex} {int(self.clock() * 1000)}"
            yield Batch(tuple(("SET", key, generation, "NX") for key in fresh))
            values = yield Batch(tuple(("GET", key) for key in fresh))
            self._generations.update(
                (key, v) for key, v in zip(fresh, values, strict=True) if v is not None
            )
        self._bootstrapped = True

    def _load_customers(self, lost: set[str]) -> Flow[None]:
        """Write the configured customers whose stored definition differs from the config.

        Each customer's hash keeps a digest (`cfg`) of the definition last loaded into it, written
        once its entitlement, balances and API keys are stored. One pipelined read of the digests
        tells the customers already loaded from an identical definition, which are left alone:
        a start with unchanged customers writes none of them, however many there are.
        """
        api_keys = self.sentinel(None) not in lost
        todo: list[tuple[str, CustomerConfig, str]] = []
        for cid, customer in self.config.customers.items():
            _check_name(cid, "customer")
            if self.sentinel(self.keys.partition(cid)) not in lost:
                todo.append((cid, customer, self.customer_digest(customer)))
        if not todo:
            return
        stored = yield Batch(tuple(("HGET", self.keys.customer(cid), "cfg") for cid, _, _ in todo))
        changed = [item for item, seen in zip(todo, stored, strict=True) if seen != item[2]]
        for cid, customer, _ in changed:
            yield from self._put_customer(
                cid, customer, only_if_missing=True, api_keys=False, listed=False
            )
        if api_keys:
            # The configured keys of the customers written, in two batches: a configured key
            # revoked at runtime is not brought back by the next start.
            keys = [(key, cid) for cid, customer, _ in changed for key in customer.api_keys]
            if keys:
                revoked = yield Batch(
                    tuple(("SISMEMBER", self.keys.revoked_keys, key) for key, _ in keys)
                )
                pairs: list[str] = []
                for (key, cid), gone in zip(keys, revoked, strict=True):
                    if not gone:
                        pairs += (key, cid)
                if pairs:
                    yield Batch(
                        tuple(
                            ("HSET", self.keys.api_keys, *pairs[i : i + _CHUNK])
                            for i in range(0, len(pairs), _CHUNK)
                        )
                    )
            if changed:
                # last: a start dying before this line loads these customers again
                yield Batch(
                    tuple(("HSET", self.keys.customer(cid), "cfg", d) for cid, _, d in changed)
                )
        # The set of customers lives in no partition's slot, so no sentinel guards it: every
        # start adds them all again, in a few commands.
        ids = [cid for cid, _, _ in todo]
        yield Batch(
            tuple(
                ("SADD", self.keys.customers, *ids[i : i + _CHUNK])
                for i in range(0, len(ids), _CHUNK)
            )
        )

    def customer_digest(self, spec: CustomerConfig) -> str:
        """Return the digest of a configured customer as this deployment loads it at start."""
        ent = spec.entitlement
        definition = [
            _BOOT_FORMAT,
            self.deployment,
            ent.plan,
            ent.anchor.isoformat() if ent.anchor else "",
            ent.timezone,
            sorted(
                [name, b.unit, b.amount, b.overage, b.low_at] for name, b in spec.balances.items()
            ),
            spec.api_keys,
        ]
        raw = json.dumps(definition, separators=(",", ":"))
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def deployment_key(self) -> str:
        """Return the key holding the deployment's id (a ULID chosen by the first process)."""
        return f"{self.keys.prefix}:deployment"

    def _load_deployment(self) -> Flow[None]:
        key = self.deployment_key()
        chosen = new_ulid(int(self.clock() * 1000))
        _, value = yield Batch((("SET", key, chosen, "NX"), ("GET", key)))
        self.deployment = str(value or chosen)

    def put_customer(self, customer: str, spec: CustomerConfig) -> Flow[None]:
        """Create or replace a customer's entitlement; create its missing balances and keys."""
        yield from self.bootstrap()
        _check_name(customer, "customer")
        # never re-create balances at their starting amount in a slot that lost its data
        yield from self.require_data(self.sentinel(self.keys.partition(customer)))
        yield from self._put_customer(customer, spec, only_if_missing=False)

    def _put_customer(
        self,
        cid: str,
        spec: CustomerConfig,
        *,
        only_if_missing: bool,
        api_keys: bool = True,
        listed: bool = True,
    ) -> Flow[None]:
        # api_keys, listed: False when the caller stores the keys, or adds the customer to the
        # set of customers, itself (a start does both for many customers at once)
        _check_name(cid, "customer")
        ent = spec.entitlement
        self._check_entitlement(ent.plan, ent.timezone)
        anchor = ent.anchor.isoformat() if ent.anchor else ""
        yield Script(
            "customer",
            (self.keys.customer(cid),),
            (
                ent.plan,
                anchor,
                ent.timezone,
                "1" if only_if_missing else "0",
                str(int(self.clock() * 1000)),
                self.deployment,
            ),
        )
        if listed:
            yield Command(("SADD", self.keys.customers, cid))
        for name, balance in spec.balances.items():
            yield from self._create_balance(cid, name, balance, keep_settings=only_if_missing)
        for key_hash in spec.api_keys if api_keys else ():
            # a configured key revoked at runtime is not brought back by the next start
            if not (yield Command(("SISMEMBER", self.keys.revoked_keys, key_hash))):
                yield Command(("HSET", self.keys.api_keys, key_hash, cid))
        self._entitlements.pop(cid, None)

    def _check_entitlement(self, plan: str, timezone: str) -> None:
        if plan not in self.plans:
            raise InvalidAmount("entitlement.plan", f"plan '{plan}' is not defined")
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidAmount("entitlement.timezone", f"unknown timezone '{timezone}'") from None

    def set_entitlement(
        self,
        customer: str,
        plan: str,
        anchor: datetime | None = None,
        timezone: str | None = None,
    ) -> Flow[None]:
        """Change a customer's plan (effective now), anchor or timezone; the period usage stays."""
        yield from self.bootstrap()
        _check_name(customer, "customer")
        current = yield from self.entitlement(customer)
        if current is None:
            yield from self.require_data(self.sentinel(self.keys.partition(customer)))
        tz = timezone or (current.timezone if current else "UTC")
        self._check_entitlement(plan, tz)
        if anchor is None and current is not None:
            anchor = current.anchor
        yield Script(
            "customer",
            (self.keys.customer(customer),),
            (
                plan,
                anchor.isoformat() if anchor else "",
                tz,
                "0",
                str(int(self.clock() * 1000)),
                self.deployment,
            ),
        )
        yield Command(("SADD", self.keys.customers, customer))
        self._entitlements.pop(customer, None)

    def entitlement(self, customer: str) -> Flow[Entitlement | None]:
        """Return the customer's entitlement (cached; the admission script checks the version)."""
        cached = self._entitlements.get(customer)
        if cached is not None:
            return cached
        fields = yield Command(("HGETALL", self.keys.customer(customer)))
        if not fields or "plan" not in fields:
            # a customer that is missing because the store lost its data is not unknown
            yield from self.require_data(self.sentinel(self.keys.partition(customer)))
            return None
        anchor = datetime.fromisoformat(fields["anchor"]) if fields.get("anchor") else None
        ent = Entitlement(fields["plan"], anchor, fields.get("tz") or "UTC", fields.get("ver", ""))
        self._entitlements[customer] = ent
        return ent

    def customer_for_key(self, api_key: str) -> Flow[str | None]:
        """Return the customer holding an API key (looked up by its hash), or None."""
        yield from self.bootstrap()
        digest = hash_api_key(api_key)
        while True:
            # The count first: a revocation after it is seen at the next check.
            version, found = yield Batch(
                (("GET", self.keys.revocations), ("HGET", self.keys.api_keys, digest))
            )
            if self.revocations.observe(version):
                break
        if not found:
            yield from self.require_data(self.sentinel(None))
        return str(found) if found else None

    def add_api_key(self, customer: str, api_key: str) -> Flow[str]:
        """Store the hash of a new API key for a customer and return the hash."""
        digest = hash_api_key(api_key)
        yield Command(("HSET", self.keys.api_keys, digest, customer))
        return digest

    def remove_api_key(self, key_hash: str) -> Flow[bool]:
        """Revoke an API key by its hash; return whether it existed."""
        removed = yield Command(("HDEL", self.keys.api_keys, key_hash))
        yield Command(("SADD", self.keys.revoked_keys, key_hash))
        yield from self.revoked()
        return bool(removed)

    def revoked(self) -> Flow[None]:
        """Tell every process that an API key was revoked (this one at once, others at their
        next check of the revocation count)."""
        self.revocations.observe((yield Command(("INCR", self.keys.revocations))))

    # -- admissions ------------------------------------------------------------------------

    def admit(
        self,
        customer: str,
        amounts: Mapping[str, int],
        idempotency_key: str | None = None,
        *,
        estimates: Mapping[str, int] | None = None,
        hold_ttl_ms: int = 300_000,
        lease_ttl_ms: int | None = None,
        attempt: str | None = None,
        operation: str | None = None,
    ) -> Flow[Decision]:
        """Decide and record one admission of (metric, amount) pairs, all or nothing.

        `attempt` (from `new_attempt`) names this call for `refund`, also when its reply is lost;
        `operation` replaces the operation id of `idempotency_key` (HTTP keys use their own)."""
        ops = {m: ("a", check_amount(v, f"amounts.{m}")) for m, v in amounts.items()}
        for metric, estimate in (estimates or {}).items():
            if metric in ops:
                raise InvalidAmount(f"estimates.{metric}", "the metric is also in amounts")
            spec = self.config.metrics.get(metric)
            if spec is not None and spec.type not in ("CumulativeCounter", "TotalCounter"):
                raise InvalidAmount(f"estimates.{metric}", f"a {spec.type} cannot be estimated")
            ops[metric] = ("e", check_amount(estimate, f"estimates.{metric}"))
        if not ops:
            raise InvalidAmount("amounts", "name at least one metric")
        return (
            yield from self._apply(
                customer,
                ops,
                idempotency_key,
                hold_ttl_ms=hold_ttl_ms,
                lease_ttl_ms=lease_ttl_ms,
                op_id=operation,
                attempt=attempt or self.new_attempt(),
            )
        )

    def grant(
        self, customer: str, amounts: Mapping[str, int], requests: int, ttl_ms: int
    ) -> Flow[Decision]:
        """Take a local allowance: hold, as one estimate, up to `requests` requests of `amounts`
        that stay inside every asset's current tier and above every balance's floor.

        An allowed Decision's ticket holds the allowance (`requests` granted, `estimated` units
        per metric); a refused one (problem `none`) means the next request goes per request:
        it meets a boundary, or an asset may not be admitted locally (problem `ineligible`)."""
        ops = {m: ("g", check_amount(v, f"amounts.{m}", positive=True)) for m, v in amounts.items()}
        if not ops or requests < 1:
            raise InvalidAmount("requests", "grant at least one request of one metric")
        return (
            yield from self._apply(
                customer, ops, None, fingerprint=str(requests), hold_ttl_ms=ttl_ms, grant=True
            )
        )

    def new_attempt(self) -> str:
        """Return a fresh attempt id, unique across processes."""
        return f"{self._ids_prefix}{next(self._ids):x}"

    def record(
        self, customer: str, metric: str, value: int, idempotency_key: str | None = None
    ) -> Flow[Decision]:
        """Record usage outside a request: add, set (Gauge), running total or signed delta."""
        kind = self._metric_kind(metric)
        check_amount(value, "value", signed=kind == "UpDownCounter")
        return (yield from self._apply(customer, {metric: ("r", value)}, idempotency_key))

    def settle(self, ticket: Ticket, actuals: Mapping[str, int] | None = None) -> Flow[Decision]:
        """Settle what an admission left open: record actual units of estimates, end leases.

        A ticket settles once: settling it again returns the first settlement, whatever the actuals.
        """
        actuals = dict(actuals or {})
        ops: dict[str, tuple[str, int]] = {}
        for metric, estimate in ticket.estimated.items():
            actual = actuals.pop(metric, estimate)
            ops[metric] = ("s", check_amount(actual, f"actuals.{metric}"))
        for metric in ticket.leased:
            ops[metric] = ("x", 0)
        if actuals:
            raise InvalidAmount(f"actuals.{next(iter(actuals))}", "was not held by this admission")
        if not ops:
            return Decision(True, 200, None, ticket.customer)
        return (
            yield from self._apply(
                ticket.customer,
                ops,
                None,
                op_id="s:" + ticket.hold_id,
                hold_id=ticket.hold_id,
                plan_name=ticket.plan,
                fingerprint="settle",
            )
        )

    def refund(self, customer: str, attempt: str, operation: str = "") -> Flow[str]:
        """Undo one admission exactly once, or stop it from happening if it has not arrived yet.

        Returns 'refunded', 'void' (nothing had happened; a late arrival is now refused) or
        'done' (refunded before). A keyed admission (`operation`) is forgotten, so that a retry
        with its key is metered as new."""
        _check_name(customer, "customer")
        if not attempt:
            raise InvalidAmount("attempt", "name the admission's attempt")
        partition = self.keys.partition(customer)
        undo = self.keys.operation(customer, "u:" + attempt)
        op_key = self.keys.operation(customer, operation) if operation else undo
        for _attempt in range(3):
            record = yield Command(("GET", undo))
            metrics, balances, window = _undo_names(record)
            keys = [
                undo,
                op_key,
                self.keys.outbox(partition),
                self.keys.customer(customer),
                self.keys.ledger(customer),
            ]
            for metric in metrics:
                keys += self.keys.asset(customer, metric)
            for name in balances:
                keys += self.keys.balance(customer, name)
            keys += (
                self.keys.usage_window(partition, window),
                self.keys.usage_open(partition),
                self.keys.holds(partition),
            )
            reply = yield Script(
                "refund",
                tuple(keys),
                (
                    str(int(self.clock() * 1000)),
                    str(AUTO_OP_TTL_S),
                    customer,
                    str(len(metrics)),
                    str(len(balances)),
                    *metrics,
                    *balances,
                ),
            )
            if reply[0] != "stale":
                return str(reply[0])
        raise RuntimeError(f"the admission {attempt!r} keeps changing; try again")

    def _shape(self, customer: str, assets: list[CompiledAsset]) -> _Shape:
        balances = list(dict.fromkeys(a.balance for a in assets if a.balance))
        partition = self.keys.partition(customer)
        asset_keys: list[str] = []
        asset_args = []
        for asset in assets:
            asset_keys += self.keys.asset(customer, asset.metric)
            index = balances.index(asset.balance) + 1 if asset.balance else 0
            rest = (str(index), str(len(asset.tiers)), asset.tier_flags, *asset.tier_args)
            asset_args.append(((asset.metric, asset.kind), rest))
        for name in balances:
            asset_keys += self.keys.balance(customer, name)
        return _Shape(
            assets=assets,
            balances=balances,
            head=(
                self.keys.operation(customer, ""),
                self.keys.outbox(partition),
                self.keys.customer(customer),
                self.keys.ledger(customer),
            ),
            asset_keys=tuple(asset_keys),
            asset_args=asset_args,
            tail=(
                self.keys.usage_open(partition),
                self.keys.closing(partition),
                self.keys.holds(partition),
            ),
            partition=partition,
            counts=(str(len(assets)), str(len(balances)), *balances),
            leases=frozenset(a.metric for a in assets if a.kind == "U"),
        )

    def _metric_kind(self, metric: str) -> str:
        spec = self.config.metrics.get(metric)
        if spec is None:
            raise NotFound(f"metric '{metric}' is not defined")
        return spec.type

    def _apply(
        self,
        customer: str,
        ops: Mapping[str, tuple[str, int]],
        idempotency_key: str | None,
        *,
        op_id: str | None = None,
        hold_id: str | None = None,
        plan_name: str | None = None,
        fingerprint: str | None = None,
        hold_ttl_ms: int = 300_000,
        lease_ttl_ms: int | None = None,
        attempt: str = "",
        grant: bool = False,
    ) -> Flow[Decision]:
        if not self._bootstrapped:
            yield from self.bootstrap()
        if op_id is None:
            # Without a key the caller will not retry, and the script keeps no operation record.
            op_id = f"k:{idempotency_key}" if idempotency_key else ""
        ttl = KEYED_OP_TTL_S if idempotency_key or hold_id or op_id else AUTO_OP_TTL_S
        hold_id = hold_id or op_id or f"a:{attempt or self.new_attempt()}"
        if fingerprint is None:
            # the fingerprint only matters to an operation record
            fingerprint = (
                "|".join(f"{m}:{mode}:{v}" for m, (mode, v) in sorted(ops.items())) if op_id else ""
            )
        for _attempt in range(3):
            ent = self._entitlements.get(customer)
            if ent is None:
                ent = yield from self.entitlement(customer)
            if ent is None:
                return Decision(
                    False, 401, "unauthenticated", customer, detail=f"unknown customer '{customer}'"
                )
            shape_key = (plan_name or ent.plan, tuple(ops))
            shape = ent.shapes.get(shape_key)
            if shape is None:
                plan = self.plans.get(shape_key[0], {})
                missing = [m for m in ops if m not in plan]
                if missing:
                    return Decision(
                        False,
                        403,
                        "not-entitled",
                        customer,
                        metric=missing[0],
                        detail=f"plan '{ent.plan}' has no configuration for metric '{missing[0]}'",
                    )
                shape = ent.shapes[shape_key] = self._shape(customer, [plan[m] for m in ops])
            assets, balances = shape.assets, shape.balances
            if grant and not all(a.local for a in assets):
                return Decision(False, 0, "ineligible", customer)
            now_s = self.clock()
            now_ms = int(now_s * 1000)
            keys = [*shape.head]
            if op_id:
                keys[0] = self.keys.operation(customer, op_id)
            args = [
                str(now_ms),
                op_id,
                fingerprint,
                str(ttl),
                customer,
                ent.version,
                hold_id,
                str(now_ms + hold_ttl_ms),
                str(now_ms + (lease_ttl_ms or self.default_lease_ms)),
                *shape.counts,
            ]
            windows: list[tuple[int, int] | None] = []
            for asset, (named, rest) in zip(assets, shape.asset_args, strict=True):
                mode, amount = ops[asset.metric]
                if asset.period:
                    ps, pe, period_args = ent.window(asset.period, now_s)
                    windows.append((ps, pe))
                    args += (*named, mode, str(amount), *period_args, *rest)
                else:
                    windows.append(None)
                    args += (*named, mode, str(amount), "0", "0", "", "", *rest)
            keys += shape.asset_keys
            interval_ms = self.config.usage_report_interval
            window_start = now_ms - now_ms % interval_ms
            if shape.window[0] != window_start:
                shape.window = (
                    window_start,
                    self.keys.usage_window(shape.partition, window_start),
                    (str(window_start), str(window_start + interval_ms)),
                )
            keys.append(shape.window[1])
            keys += shape.tail
            keys.append(self.keys.operation(customer, "u:" + attempt) if attempt else keys[0])
            args += shape.window[2]
            args.append(attempt)
            reply = wire.decode_admit((yield Script("admit", tuple(keys), tuple(args))))
            if isinstance(reply, tuple):
                kind, detail = reply
                if kind == "stale":
                    self._entitlements.pop(customer, None)
                    continue
                if kind == "void":  # this attempt was refunded before it arrived
                    return Decision(False, 503, "metering-unavailable", customer)
                # this attempt was already applied (its reply was lost): its ticket settles it
                done = Ticket(
                    customer, plan_name or ent.plan, detail or hold_id, {}, {}, attempt=attempt
                )
                return Decision(True, 200, None, customer, detail=ALREADY_APPLIED, ticket=done)
            if grant:
                return _granted(
                    customer, ent.plan, hold_id, ops, assets, windows, balances, reply, now_s
                )
            if reply.status == "402" and reply.empty_balance:
                # 402 for a balance that may be missing: only when its slot kept its data
                yield from self.require_data(self.sentinel(self.keys.partition(customer)))
            ticket = None
            leased = {m: ops[m][1] for m in shape.leases if ops[m][0] == "a"}
            estimated = {m: v for m, (mode, v) in ops.items() if mode == "e"}
            if leased or estimated or attempt:
                ticket = Ticket(
                    customer,
                    plan_name or ent.plan,
                    hold_id,
                    estimated,
                    leased,
                    attempt=attempt,
                    operation=op_id,
                )
            return _decision(customer, assets, windows, balances, reply, now_s, ticket)
        raise RuntimeError(f"the entitlement of '{customer}' keeps changing; try again")

    # -- reads -----------------------------------------------------------------------------

    def usage(self, customer: str, metric: str) -> Flow[AssetUsage]:
        """Return one asset's usage: value, level, policy, period, limit, remaining, overage."""
        yield from self.bootstrap()
        self._metric_kind(metric)
        ent = yield from self.entitlement(customer)
        if ent is None:
            raise NotFound(f"customer '{customer}' does not exist")
        asset = self.plans[ent.plan].get(metric)
        if asset is None:
            raise NotFound(f"plan '{ent.plan}' has no configuration for metric '{metric}'")
        now_s = self.clock()
        akey, axkey = self.keys.asset(customer, metric)
        reply = yield Script(
            "asset",
            (
                self.keys.outbox(self.keys.partition(customer)),
                self.keys.customer(customer),
                akey,
                axkey,
            ),
            (str(int(now_s * 1000)), customer, "read", metric, asset.kind, ""),
        )
        read = wire.decode_asset_read(reply)
        value, level, overage = read.value, read.level, read.overage
        window = None
        if asset.period:
            ps, pe, _ = ent.window(asset.period, now_s)
            window = (ps, pe)
            if asset.kind in "CT" and read.period_start_ms < ps * 1000:
                value, level, overage = 0, 0, 0
        return _usage(asset, value, read.pending, level, overage, read.suspended, window, -1)

    def suspend_asset(
        self, customer: str, metric: str, *, resume: bool = False
    ) -> Flow[AssetUsage]:
        """Suspend (or resume) one asset: admissions on it are refused with 403 until resumed."""
        yield from self.bootstrap()
        ent = yield from self.entitlement(customer)
        if ent is None:
            raise NotFound(f"customer '{customer}' does not exist")
        kind = self._metric_kind(metric)
        if metric not in self.plans[ent.plan]:
            raise NotFound(f"plan '{ent.plan}' has no configuration for metric '{metric}'")
        akey, axkey = self.keys.asset(customer, metric)
        yield Script(
            "asset",
            (
                self.keys.outbox(self.keys.partition(customer)),
                self.keys.customer(customer),
                akey,
                axkey,
            ),
            (
                str(int(self.clock() * 1000)),
                customer,
                "resume" if resume else "suspend",
                metric,
                kind,
                "admin",
            ),
        )
        return (yield from self.usage(customer, metric))

    def ledger(
        self, customer: str, limit: int = 100, *, offset: int | None = None
    ) -> Flow[list[dict[str, Any]]]:
        """Return the customer's balance mutations, newest first.

        Usage charges appear as one `usage` line per balance and usage report window, with the
        number of charges in `count`; a window still open is read from its balance. With an
        `offset` (a page of `limit` stored lines), the open windows' lines come on top of the
        first page, which may then hold more than `limit` lines.
        """
        check_amount(limit, "limit", positive=True)
        count = min(limit, LEDGER_LIMIT)
        first = offset or 0
        rows, fields = yield Batch(
            (
                ("LRANGE", self.keys.ledger(customer), str(first), str(first + count - 1)),
                ("HGETALL", self.keys.customer(customer)),
            )
        )
        entries = [json.loads(row) for row in rows]
        names = sorted(f[3:] for f in fields or {} if f.startswith("lu:") and not first)
        if names:
            pending = yield Batch(
                tuple(
                    ("HMGET", self.keys.balance(customer, name)[0], *_USAGE_LINE) for name in names
                )
            )
            for name, line in zip(names, pending, strict=True):
                if line[0] is not None:
                    _insert_by_time(entries, _usage_line(name, line))
        return entries if offset is not None else entries[:count]

    # -- balances --------------------------------------------------------------------------

    def _create_balance(
        self, customer: str, name: str, spec: BalanceConfig, *, keep_settings: bool = False
    ) -> Flow[BalanceState]:
        """Create a balance; update an existing one's settings unless `keep_settings` (at start,
        the config must not undo overage or low_at changed at runtime)."""
        _check_name(name, "balance")
        low = "" if spec.low_at is None else str(spec.low_at)
        return (
            yield from self._balance_op(
                customer,
                name,
                "create",
                spec.amount,
                extra=(spec.unit, str(spec.overage), low, "1" if keep_settings else "0"),
                op_id=f"create:{name}",
            )
        )

    def create_balance(self, customer: str, name: str, spec: BalanceConfig) -> Flow[BalanceState]:
        """Create a balance with its starting amount, or update the settings of an existing one."""
        yield from self.bootstrap()
        yield from self.require_data(self.sentinel(self.keys.partition(customer)))
        return (yield from self._create_balance(customer, name, spec))

    def balance_op(
        self,
        customer: str,
        name: str,
        op: str,
        amount: int = 0,
        idempotency_key: str | None = None,
    ) -> Flow[BalanceState]:
        """Apply topup, withdraw, suspend, resume or read to a balance, once per operation id."""
        yield from self.bootstrap()
        if op in ("topup", "withdraw"):
            check_amount(amount, "amount", positive=True)
        return (yield from self._balance_op(customer, name, op, amount, idempotency_key))

    def reserve(
        self,
        customer: str,
        name: str,
        amount: int,
        ttl_s: int,
        idempotency_key: str | None = None,
    ) -> Flow[tuple[str, int]]:
        """Hold `amount` on a balance for `ttl_s` s; return (reservation id, expiry epoch s).

        With an idempotency key, the reservation id derives from it and the script decides
        duplicates atomically: any number of concurrent retries make one reservation."""
        yield from self.bootstrap()
        check_amount(amount, "amount", positive=True)
        check_amount(ttl_s, "ttl_s", positive=True)
        rid = self.reservation_id(customer, name, idempotency_key)
        expires_ms = int(self.clock() * 1000) + ttl_s * 1000
        reply: list[str] = []
        yield from self._balance_op(
            customer,
            name,
            "reserve",
            amount,
            idempotency_key,
            rid=rid,
            expiry_ms=expires_ms,
            fingerprint=f"reserve:{name}:{amount}:{ttl_s}",
            reply_out=reply,
        )
        if len(reply) > 10:
            expires_ms = int(reply[10])
        return rid, math.ceil(expires_ms / 1000)

    def reservation_id(self, customer: str, name: str, idempotency_key: str | None) -> str:
        """Return the id of a reservation: derived from its idempotency key, else random."""
        nonce = None
        if idempotency_key:
            nonce = hashlib.sha256(f"{customer}\x1f{idempotency_key}".encode()).hexdigest()[:16]
        return _encode_rid(customer, name, nonce)

    def cancel_reservation(self, customer: str, name: str, idempotency_key: str) -> Flow[str]:
        """Undo the reservation made (or still on its way) with `idempotency_key` whose reply was
        lost: release its hold, or void it if it has not arrived. Returns 'voided', 'released'
        or 'closed' (it was committed, released or expired meanwhile)."""
        yield from self.bootstrap()
        rid = self.reservation_id(customer, name, idempotency_key)
        reply: list[str] = []
        try:
            yield from self._balance_op(
                customer,
                name,
                "cancel",
                0,
                idempotency_key,
                rid=rid,
                fingerprint="cancel",
                reply_out=reply,
            )
        except Conflict:
            return "closed"
        return "voided" if reply[1] == "voided" else "released"

    def close_reservation(
        self, rid: str, op: str, amount: int = 0, idempotency_key: str | None = None
    ) -> Flow[BalanceState]:
        """Commit (charge `amount`, release the rest) or release a reservation, exactly once.

        A second close raises Conflict `reservation-closed`; pass an idempotency key to make a
        retry after a timeout return the first result instead."""
        yield from self.bootstrap()
        customer, name = _decode_rid(rid)
        if op == "commit":
            check_amount(amount, "amount")
        return (yield from self._balance_op(customer, name, op, amount, idempotency_key, rid=rid))

    def _balance_op(
        self,
        customer: str,
        name: str,
        op: str,
        amount: int,
        idempotency_key: str | None = None,
        *,
        rid: str = "",
        expiry_ms: int = 0,
        extra: tuple[str, ...] = ("", "0", ""),
        op_id: str | None = None,
        fingerprint: str | None = None,
        reply_out: list[str] | None = None,
    ) -> Flow[BalanceState]:
        if op_id is None:
            op_id = f"k:{idempotency_key}" if idempotency_key else f"a:{uuid.uuid4().hex}"
        if fingerprint is None:
            # every parameter: the same key on another reservation is a conflict, not a replay
            fingerprint = f"{op}:{name}:{amount}:{rid}"
        bkey, bxkey = self.keys.balance(customer, name)
        reply = yield Script(
            "balance",
            (
                self.keys.operation(customer, op_id),
                self.keys.outbox(self.keys.partition(customer)),
                self.keys.customer(customer),
                self.keys.ledger(customer),
                bkey,
                bxkey,
                self.keys.holds(self.keys.partition(customer)),
            ),
            (
                str(int(self.clock() * 1000)),
                op_id,
                fingerprint,
                str(KEYED_OP_TTL_S),
                customer,
                op,
                name,
                str(amount),
                rid,
                str(expiry_ms),
                *extra,
            ),
        )
        status, slug = reply[0], reply[1]
        if reply_out is not None:
            reply_out[:] = reply
        if status == "404":
            yield from self.require_data(self.sentinel(self.keys.partition(customer)))
            raise NotFound(f"balance '{name}' of customer '{customer}' does not exist")
        if status == "409":
            messages = {
                "insufficient-credits": f"withdrawing {amount} would take '{name}' below 0",
                "reservation-closed": f"reservation {rid} was committed, released or expired",
                "idempotency-conflict": "this idempotency key was used with different parameters",
            }
            raise Conflict(slug, messages.get(slug, slug))
        read = wire.decode_balance(reply)
        state = BalanceState(
            name=name,
            amount=read.amount,
            held=read.held,
            available=read.available,
            overage=read.overage,
            unit=read.unit,
            suspended=read.suspended,
            low_at=read.low_at,
        )
        if status != "200":
            raise Conflict(slug, _PROBLEM_DETAIL.get(slug, slug), status=int(status), state=state)
        return state


_USAGE_LINE = ("uw", "ud", "un", "ut", "ua", "uh")


def _undo_names(record: str | None) -> tuple[list[str], list[str], int]:
    """The metrics, balances and usage window of an admission's undo record (see admit.lua)."""
    if not record or not record.startswith("done\x1f"):
        return [], [], 0
    fields = record.split("\x1f")
    n = int(fields[3])
    metrics = [fields[4 + 9 * i] for i in range(n)]
    q = 4 + 9 * n
    balances = [fields[q + 1 + 3 * j] for j in range(int(fields[q]))]
    return metrics, balances, int(fields[2])


def _usage_line(balance: str, fields: list[str]) -> dict[str, Any]:
    """The ledger line of a usage window still open in a balance hash (see lib.lua flush_usage)."""
    window, delta, count, at, amount, held = (int(f) for f in fields)
    return {
        "op": f"usage:{window}",
        "kind": "usage",
        "balance": balance,
        "delta": delta,
        "amount": amount,
        "held": held,
        "time": at,
        "count": count,
        "window": window,
    }


def _insert_by_time(entries: list[dict[str, Any]], line: dict[str, Any]) -> None:
    """Put `line` before the first entry not newer than it, keeping the stored order otherwise."""
    for i, entry in enumerate(entries):
        if entry["time"] <= line["time"]:
            entries.insert(i, line)
            return
    entries.append(line)


def _granted(
    customer: str,
    plan: str,
    hold_id: str,
    ops: Mapping[str, tuple[str, int]],
    assets: list[CompiledAsset],
    windows: list[tuple[int, int] | None],
    balances: list[str],
    reply: wire.AdmitReply,
    now_s: float,
) -> Decision:
    """A grant's decision: the admission's, with the requests granted in retry-after's place and
    each balance's credits held by the grant in the place of its total held."""
    if reply.status != "200":
        return Decision(False, 0, reply.slug or "none", customer)
    requests = reply.retry_ms
    estimated = {m: requests * per for m, (_mode, per) in ops.items()}
    held = {name: b.held for name, b in zip(balances, reply.balances, strict=True)}
    ticket = Ticket(customer, plan, hold_id, estimated, {}, requests=requests, held=held)
    admitted = dataclasses.replace(reply, retry_ms=-1)
    return _decision(customer, assets, windows, balances, admitted, now_s, ticket)


def _usage(
    asset: CompiledAsset,
    value: int,
    pending: int,
    level: int,
    overage: int,
    suspended: bool,
    window: tuple[int, int] | None,
    throttle_remaining: int,
) -> AssetUsage:
    tier = asset.tier_index(value)
    limit = asset.limits[tier]
    remaining = None if limit is None else max(0, limit - value - pending)
    throttle = None
    rate = asset.tiers[tier].rate
    if rate is not None and throttle_remaining >= 0:
        throttle = Throttle(rate.limit, max(1, rate.per // 1000), throttle_remaining)
    return AssetUsage(
        metric=asset.metric,
        value=value,
        pending=pending,
        level=LEVELS[level],
        policy=asset.tiers[tier].policy,
        limit=limit,
        remaining=remaining,
        overage=overage,
        suspended=suspended,
        period_start=window[0] if window else None,
        period_end=window[1] if window else None,
        throttle=throttle,
        concurrent=asset.kind == "U",
    )


def _decision(
    customer: str,
    assets: list[CompiledAsset],
    windows: list[tuple[int, int] | None],
    balances: list[str],
    reply: wire.AdmitReply,
    now_s: float,
    ticket: Ticket | None,
) -> Decision:
    status = int(reply.status)
    slug = reply.slug or None
    if status == 409:
        return Decision(False, 409, slug, customer, detail=_PROBLEM_DETAIL[str(slug)])
    retry_ms, refused = reply.retry_ms, reply.refused
    usages: dict[str, AssetUsage] = {}
    top = 0
    for asset, state, window in zip(assets, reply.assets, windows, strict=True):
        usages[asset.metric] = _usage(
            asset,
            state.value,
            state.pending,
            state.level,
            state.overage,
            state.suspended,
            window,
            state.throttle,
        )
        top = max(top, state.level)
    available = {name: b.available for name, b in zip(balances, reply.balances, strict=True)}
    metric = assets[refused - 1].metric if refused else None
    refused_by = None
    if refused and slug == "quota-exceeded" and metric is not None:
        tier = assets[refused - 1].quota_tier(usages[metric].value)
        refused_by = (tier.level, tier.policy) if tier else None
    detail = _PROBLEM_DETAIL.get(slug or "", "").format(metric=metric) or None
    retry = None if retry_ms < 0 else max(1, math.ceil(retry_ms / 1000))
    return Decision(
        allowed=status == 200,
        status=status,
        problem=slug,
        customer=customer,
        level=LEVELS[top],
        retry_after=retry,
        metric=metric,
        detail=detail,
        assets=usages,
        balances=available,
        ticket=ticket if status == 200 else None,
        refused_by=refused_by,
    )
