"""Every metering operation as a sans-I/O flow: a generator yielding storage calls, getting replies.

`Meter` and `AsyncMeter` drive these flows with a three-line sync or async loop (the model is
httpx's `Auth.auth_flow`), so the logic exists once and never touches a socket.

`MeterCore` holds the state the flows share (config, keys, compiled plans, cached entitlements)
and the start-up, customer and read flows; admissions live in `core/admissions.py`, balances and
the ledger in `core/balances.py`, the calls and shared values in `core/calls.py`, the replies'
layouts in `core/wire.py`. Their functions are bound as `MeterCore`'s methods.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from metergate.config import (
    CustomerConfig,
    GatewayConfig,
    hash_api_key,
)
from metergate.core import admissions, balances, wire
from metergate.core.calls import (
    ALREADY_APPLIED,
    LOST_DATA,
    Batch,
    Command,
    Entitlement,
    Flow,
    Script,
    check_amount,
)
from metergate.core.errors import InvalidAmount, NotFound, StorageUnavailable
from metergate.core.ids import new_ulid
from metergate.core.keys import Keys
from metergate.core.model import AssetUsage
from metergate.core.names import check_name
from metergate.core.plans import CompiledAsset, compile_plans
from metergate.core.revocations import Revocations

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
_BOOT_FORMAT = 1  # the version of what a customer's start-up digest covers
_CHUNK = 1000  # members or field pairs per command when a start writes many at once


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
            check_name(cid, "customer")
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
        check_name(customer, "customer")
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
        check_name(cid, "customer")
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
        check_name(customer, "customer")
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

    # -- admissions (core/admissions.py) ---------------------------------------------------

    admit = admissions.admit
    grant = admissions.grant
    record = admissions.record
    settle = admissions.settle
    refund = admissions.refund
    _shape = admissions._shape
    _apply = admissions._apply

    def new_attempt(self) -> str:
        """Return a fresh attempt id, unique across processes."""
        return f"{self._ids_prefix}{next(self._ids):x}"

    def _metric_kind(self, metric: str) -> str:
        spec = self.config.metrics.get(metric)
        if spec is None:
            raise NotFound(f"metric '{metric}' is not defined")
        return spec.type

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
        return admissions.usage_of(
            asset, value, read.pending, level, overage, read.suspended, window, -1
        )

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

    # -- balances and the ledger (core/balances.py) ----------------------------------------

    ledger = balances.ledger
    _create_balance = balances._create_balance
    create_balance = balances.create_balance
    balance_op = balances.balance_op
    reserve = balances.reserve
    reservation_id = balances.reservation_id
    cancel_reservation = balances.cancel_reservation
    close_reservation = balances.close_reservation
    _balance_op = balances._balance_op
