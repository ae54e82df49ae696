"""Flows for the admin side: customer records, API keys, and the outbox listing."""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import UTC, datetime
from typing import Any

from metergate.config import hash_api_key
from metergate.core.errors import NotFound
from metergate.core.flows import Command, Entitlement, Flow, MeterCore

__all__ = [
    "customer_ids",
    "customer_view",
    "events",
    "find_entitlement",
    "issue_api_key",
    "redeliver",
    "revoke_api_key",
]


def find_entitlement(core: MeterCore, customer: str) -> Flow[Entitlement | None]:
    """Return a customer's stored entitlement, read fresh (after loading configured customers)."""
    yield from core.bootstrap()
    core.forget(customer)
    return (yield from core.entitlement(customer))


def _key_id(key_hash: str) -> str:
    return key_hash.removeprefix("sha256:")[:16]


def issue_api_key(core: MeterCore, customer: str) -> Flow[dict[str, str]]:
    """Issue a new API key: the plain key is returned once, only its hash is stored."""
    ent = yield from find_entitlement(core, customer)
    if ent is None:
        raise NotFound(f"customer '{customer}' does not exist")
    plain = "mg_" + secrets.token_urlsafe(24)
    digest = hash_api_key(plain)
    yield Command(("HSET", core.keys.api_keys, digest, customer))
    yield Command(("HSET", _customer_keys(core, customer), _key_id(digest), digest))
    return {"id": _key_id(digest), "key": plain}


def _customer_keys(core: MeterCore, customer: str) -> str:
    return core.keys.customer_keys(customer)


def revoke_api_key(core: MeterCore, customer: str, key_id: str) -> Flow[None]:
    """Revoke one of a customer's API keys by its id."""
    digest = yield Command(("HGET", _customer_keys(core, customer), key_id))
    if not digest:
        # keys from the config file are indexed by their hash only
        configured = core.config.customers.get(customer)
        for candidate in configured.api_keys if configured else []:
            if _key_id(candidate) == key_id:
                digest = candidate
    if not digest:
        raise NotFound(f"API key '{key_id}' of customer '{customer}' does not exist")
    owner = yield Command(("HGET", core.keys.api_keys, digest))
    if owner != customer:
        raise NotFound(f"API key '{key_id}' of customer '{customer}' does not exist")
    yield Command(("HDEL", core.keys.api_keys, digest))
    yield Command(("HDEL", _customer_keys(core, customer), key_id))
    yield Command(("SADD", core.keys.revoked_keys, digest))
    yield from core.revoked()


def customer_view(core: MeterCore, customer: str) -> Flow[dict[str, Any]]:
    """Return a customer's entitlement, key ids and balance names as the admin API shows them."""
    ent = yield from find_entitlement(core, customer)
    if ent is None:
        raise NotFound(f"customer '{customer}' does not exist")
    key_ids = yield Command(("HKEYS", _customer_keys(core, customer)))
    raw_history = yield Command(("HGET", core.keys.customer(customer), "hist"))
    configured = core.config.customers.get(customer)
    ids = set(key_ids or [])
    if configured is not None:
        ids |= {_key_id(k) for k in configured.api_keys}
    balances = {a.balance for a in core.plans.get(ent.plan, {}).values() if a.balance}
    if configured is not None:
        balances |= set(configured.balances)
    return {
        "id": customer,
        "entitlement": {
            "plan": ent.plan,
            "anchor": ent.anchor.isoformat() if ent.anchor else None,
            "timezone": ent.timezone,
        },
        "history": _history(raw_history, ent),
        "api_keys": sorted(ids),
        "balances": sorted(balances),
    }


def _rfc3339(ms: int) -> str:
    spec = "seconds" if ms % 1000 == 0 else "milliseconds"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec=spec).replace("+00:00", "Z")


def _history(raw: str | None, current: Entitlement) -> list[dict[str, Any]]:
    """The entitlements in force over time, oldest first: `{plan, anchor, timezone, since}`.
    A customer stored before histories were kept shows its current entitlement since the epoch."""
    rows = json.loads(raw) if raw else []
    if not rows:
        anchor = current.anchor.isoformat() if current.anchor else ""
        rows = [[current.plan, anchor, current.timezone, "0"]]
    return [
        {
            "plan": plan,
            "anchor": anchor or None,
            "timezone": timezone,
            "since": _rfc3339(int(since)),
        }
        for plan, anchor, timezone, since in rows
    ]


def customer_ids(core: MeterCore) -> Flow[list[str]]:
    """Return every customer id, sorted (configured ones and those created at runtime)."""
    yield from core.bootstrap()
    ids = yield Command(("SMEMBERS", core.keys.customers))
    return sorted(ids or [])


def events(
    core: MeterCore, limit: int = 100, *, customer: str | None = None
) -> Flow[list[dict[str, Any]]]:
    """Return the newest outbox events and dead letters of every partition, newest first.

    With `customer`, only that customer's events among the newest `limit` of its partition."""
    out: list[dict[str, Any]] = []
    partitions = [core.keys.partition(customer)] if customer is not None else None
    for partition in partitions or range(core.keys.partitions):
        for key, status in (
            (core.keys.outbox(partition), "queued"),
            (core.keys.dead_letters(partition), "dead"),
        ):
            rows = yield Command(("XREVRANGE", key, "+", "-", "COUNT", str(limit)))
            for stream_id, fields in rows or []:
                event = _event(stream_id, fields, partition)
                if customer is None or event["customer"] == customer:
                    out.append({**event, "status": status})
    out.sort(key=lambda e: (e["time"], e["stream_id"]), reverse=True)
    return out[:limit]


def _event(stream_id: str, fields: Any, partition: int) -> dict[str, Any]:
    data = (
        dict(zip(fields[::2], fields[1::2], strict=True))
        if isinstance(fields, list)
        else dict(fields)
    )
    event = {
        "id": data.get("id"),
        "type": data.get("type"),
        "customer": data.get("customer"),
        "time": int(data.get("time", 0)),
        "data": json.loads(data.get("data", "{}")),
        "stream_id": stream_id,
        "partition": partition,
    }
    for extra in ("destination", "reason", "dead_at"):  # dead letters say where and why
        if extra in data:
            event[extra] = data[extra]
    return event


def redeliver(core: MeterCore, event_id: str) -> Flow[dict[str, Any]]:
    """Deliver an event again: a dead letter to its one destination, else to every endpoint."""
    for partition in _partitions_of(core, event_id):
        for key in (core.keys.dead_letters(partition), core.keys.outbox(partition)):
            rows = yield Command(("XRANGE", key, "-", "+"))
            for stream_id, fields in reversed(rows or []):
                event = _event(stream_id, fields, partition)
                if event["id"] != event_id:
                    continue
                flat = (
                    fields if isinstance(fields, list) else [x for kv in fields.items() for x in kv]
                )
                pairs = dict(zip(flat[::2], flat[1::2], strict=True))
                copy = [
                    x
                    for k in ("id", "type", "customer", "time", "data")
                    if k in pairs
                    for x in (k, pairs[k])
                ]
                if "destination" in pairs:  # the same webhook-id, to the endpoint that gave up
                    copy += ["only", pairs["destination"]]
                yield Command(("XADD", core.keys.outbox(partition), "*", *copy))
                return event
    raise NotFound(f"event '{event_id}' does not exist")


def _partitions_of(core: MeterCore, event_id: str) -> list[int]:
    """The partitions to search for an event: its customer's first (from an id
    `evt_<deployment>_<customer>_<seq>` or `evt_<customer>_<seq>`), then every other."""
    first: list[int] = []
    if event_id.startswith("evt_"):
        middle = event_id.removeprefix("evt_").rsplit("_", 1)[0]
        deployment, _, customer = middle.partition("_")
        for candidate in (middle, customer if len(deployment) == 26 else ""):
            if candidate and core.keys.partition(candidate) not in first:
                first.append(core.keys.partition(candidate))
    return first + [p for p in range(core.keys.partitions) if p not in first]


def fingerprint(body: bytes) -> str:
    """Return a short digest of a request body, for Idempotency-Key conflict checks."""
    return hashlib.sha256(body).hexdigest()[:32]
