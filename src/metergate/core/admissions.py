"""Admissions as flows: admit, grant an allowance, record, settle and refund, all through
`admit.lua` (and `refund.lua`). Functions of the core (`MeterCore` binds them as methods)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from metergate.config import (
    LEVELS,
)
from metergate.core import wire
from metergate.core.calls import (
    ALREADY_APPLIED,
    AUTO_OP_TTL_S,
    KEYED_OP_TTL_S,
    PROBLEM_DETAIL,
    Command,
    Flow,
    Script,
    Shape,
    check_amount,
)
from metergate.core.errors import InvalidAmount
from metergate.core.model import AssetUsage, Decision, Throttle, Ticket
from metergate.core.names import check_name
from metergate.core.plans import CompiledAsset

if TYPE_CHECKING:
    from metergate.core.flows import MeterCore


def admit(
    core: MeterCore,
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
        spec = core.config.metrics.get(metric)
        if spec is not None and spec.type not in ("CumulativeCounter", "TotalCounter"):
            raise InvalidAmount(f"estimates.{metric}", f"a {spec.type} cannot be estimated")
        ops[metric] = ("e", check_amount(estimate, f"estimates.{metric}"))
    if not ops:
        raise InvalidAmount("amounts", "name at least one metric")
    return (
        yield from core._apply(
            customer,
            ops,
            idempotency_key,
            hold_ttl_ms=hold_ttl_ms,
            lease_ttl_ms=lease_ttl_ms,
            op_id=operation,
            attempt=attempt or core.new_attempt(),
        )
    )


def grant(
    core: MeterCore, customer: str, amounts: Mapping[str, int], requests: int, ttl_ms: int
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
        yield from core._apply(
            customer, ops, None, fingerprint=str(requests), hold_ttl_ms=ttl_ms, grant=True
        )
    )


def record(
    core: MeterCore, customer: str, metric: str, value: int, idempotency_key: str | None = None
) -> Flow[Decision]:
    """Record usage outside a request: add, set (Gauge), running total or signed delta."""
    kind = core._metric_kind(metric)
    check_amount(value, "value", signed=kind == "UpDownCounter")
    return (yield from core._apply(customer, {metric: ("r", value)}, idempotency_key))


def settle(
    core: MeterCore, ticket: Ticket, actuals: Mapping[str, int] | None = None
) -> Flow[Decision]:
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
        yield from core._apply(
            ticket.customer,
            ops,
            None,
            op_id="s:" + ticket.hold_id,
            hold_id=ticket.hold_id,
            plan_name=ticket.plan,
            fingerprint="settle",
        )
    )


def refund(core: MeterCore, customer: str, attempt: str, operation: str = "") -> Flow[str]:
    """Undo one admission exactly once, or stop it from happening if it has not arrived yet.

    Returns 'refunded', 'void' (nothing had happened; a late arrival is now refused) or
    'done' (refunded before). A keyed admission (`operation`) is forgotten, so that a retry
    with its key is metered as new."""
    check_name(customer, "customer")
    if not attempt:
        raise InvalidAmount("attempt", "name the admission's attempt")
    partition = core.keys.partition(customer)
    undo = core.keys.operation(customer, "u:" + attempt)
    op_key = core.keys.operation(customer, operation) if operation else undo
    for _attempt in range(3):
        record = yield Command(("GET", undo))
        metrics, balances, window = _undo_names(record)
        keys = [
            undo,
            op_key,
            core.keys.outbox(partition),
            core.keys.customer(customer),
            core.keys.ledger(customer),
        ]
        for metric in metrics:
            keys += core.keys.asset(customer, metric)
        for name in balances:
            keys += core.keys.balance(customer, name)
        keys += (
            core.keys.usage_window(partition, window),
            core.keys.usage_open(partition),
            core.keys.holds(partition),
        )
        reply = yield Script(
            "refund",
            tuple(keys),
            (
                str(int(core.clock() * 1000)),
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


def _shape(core: MeterCore, customer: str, assets: list[CompiledAsset]) -> Shape:
    balances = list(dict.fromkeys(a.balance for a in assets if a.balance))
    partition = core.keys.partition(customer)
    asset_keys: list[str] = []
    asset_args = []
    for asset in assets:
        asset_keys += core.keys.asset(customer, asset.metric)
        index = balances.index(asset.balance) + 1 if asset.balance else 0
        rest = (str(index), str(len(asset.tiers)), asset.tier_flags, *asset.tier_args)
        asset_args.append(((asset.metric, asset.kind), rest))
    for name in balances:
        asset_keys += core.keys.balance(customer, name)
    return Shape(
        assets=assets,
        balances=balances,
        head=(
            core.keys.operation(customer, ""),
            core.keys.outbox(partition),
            core.keys.customer(customer),
            core.keys.ledger(customer),
        ),
        asset_keys=tuple(asset_keys),
        asset_args=asset_args,
        tail=(
            core.keys.usage_open(partition),
            core.keys.closing(partition),
            core.keys.holds(partition),
        ),
        partition=partition,
        counts=(str(len(assets)), str(len(balances)), *balances),
        leases=frozenset(a.metric for a in assets if a.kind == "U"),
    )


def _apply(
    core: MeterCore,
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
    if not core._bootstrapped:
        yield from core.bootstrap()
    if op_id is None:
        # Without a key the caller will not retry, and the script keeps no operation record.
        op_id = f"k:{idempotency_key}" if idempotency_key else ""
    ttl = KEYED_OP_TTL_S if idempotency_key or hold_id or op_id else AUTO_OP_TTL_S
    hold_id = hold_id or op_id or f"a:{attempt or core.new_attempt()}"
    if fingerprint is None:
        # the fingerprint only matters to an operation record
        fingerprint = (
            "|".join(f"{m}:{mode}:{v}" for m, (mode, v) in sorted(ops.items())) if op_id else ""
        )
    for _attempt in range(3):
        ent = core._entitlements.get(customer)
        if ent is None:
            ent = yield from core.entitlement(customer)
        if ent is None:
            return Decision(
                False, 401, "unauthenticated", customer, detail=f"unknown customer '{customer}'"
            )
        shape_key = (plan_name or ent.plan, tuple(ops))
        shape = ent.shapes.get(shape_key)
        if shape is None:
            plan = core.plans.get(shape_key[0], {})
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
            shape = ent.shapes[shape_key] = core._shape(customer, [plan[m] for m in ops])
        assets, balances = shape.assets, shape.balances
        if grant and not all(a.local for a in assets):
            return Decision(False, 0, "ineligible", customer)
        now_s = core.clock()
        now_ms = int(now_s * 1000)
        keys = [*shape.head]
        if op_id:
            keys[0] = core.keys.operation(customer, op_id)
        args = [
            str(now_ms),
            op_id,
            fingerprint,
            str(ttl),
            customer,
            ent.version,
            hold_id,
            str(now_ms + hold_ttl_ms),
            str(now_ms + (lease_ttl_ms or core.default_lease_ms)),
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
        interval_ms = core.config.usage_report_interval
        window_start = now_ms - now_ms % interval_ms
        if shape.window[0] != window_start:
            shape.window = (
                window_start,
                core.keys.usage_window(shape.partition, window_start),
                (str(window_start), str(window_start + interval_ms)),
            )
        keys.append(shape.window[1])
        keys += shape.tail
        keys.append(core.keys.operation(customer, "u:" + attempt) if attempt else keys[0])
        args += shape.window[2]
        args.append(attempt)
        reply = wire.decode_admit((yield Script("admit", tuple(keys), tuple(args))))
        if isinstance(reply, tuple):
            kind, detail = reply
            if kind == "stale":
                core._entitlements.pop(customer, None)
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
            yield from core.require_data(core.sentinel(core.keys.partition(customer)))
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


def usage_of(
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
        return Decision(False, 409, slug, customer, detail=PROBLEM_DETAIL[str(slug)])
    retry_ms, refused = reply.retry_ms, reply.refused
    usages: dict[str, AssetUsage] = {}
    top = 0
    for asset, state, window in zip(assets, reply.assets, windows, strict=True):
        usages[asset.metric] = usage_of(
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
    detail = PROBLEM_DETAIL.get(slug or "", "").format(metric=metric) or None
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
