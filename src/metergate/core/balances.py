"""Prepaid balances as flows: create, read, top up, withdraw, suspend, reserve, commit and
release through `balance.lua`, and the ledger. Functions of the core (`MeterCore` binds them)."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from typing import TYPE_CHECKING, Any

from metergate.config import (
    BalanceConfig,
)
from metergate.core import wire
from metergate.core.calls import (
    KEYED_OP_TTL_S,
    LEDGER_LIMIT,
    PROBLEM_DETAIL,
    Batch,
    Flow,
    Script,
    check_amount,
    decode_rid,
    encode_rid,
)
from metergate.core.errors import Conflict, NotFound
from metergate.core.model import BalanceState
from metergate.core.names import check_name

if TYPE_CHECKING:
    from metergate.core.flows import MeterCore


_USAGE_LINE = ("uw", "ud", "un", "ut", "ua", "uh")


def ledger(
    core: MeterCore, customer: str, limit: int = 100, *, offset: int | None = None
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
            ("LRANGE", core.keys.ledger(customer), str(first), str(first + count - 1)),
            ("HGETALL", core.keys.customer(customer)),
        )
    )
    entries = [json.loads(row) for row in rows]
    names = sorted(f[3:] for f in fields or {} if f.startswith("lu:") and not first)
    if names:
        pending = yield Batch(
            tuple(("HMGET", core.keys.balance(customer, name)[0], *_USAGE_LINE) for name in names)
        )
        for name, line in zip(names, pending, strict=True):
            if line[0] is not None:
                _insert_by_time(entries, _usage_line(name, line))
    return entries if offset is not None else entries[:count]


def _create_balance(
    core: MeterCore, customer: str, name: str, spec: BalanceConfig, *, keep_settings: bool = False
) -> Flow[BalanceState]:
    """Create a balance; update an existing one's settings unless `keep_settings` (at start,
    the config must not undo overage or low_at changed at runtime)."""
    check_name(name, "balance")
    low = "" if spec.low_at is None else str(spec.low_at)
    return (
        yield from core._balance_op(
            customer,
            name,
            "create",
            spec.amount,
            extra=(spec.unit, str(spec.overage), low, "1" if keep_settings else "0"),
            op_id=f"create:{name}",
        )
    )


def create_balance(
    core: MeterCore, customer: str, name: str, spec: BalanceConfig
) -> Flow[BalanceState]:
    """Create a balance with its starting amount, or update the settings of an existing one."""
    yield from core.bootstrap()
    yield from core.require_data(core.sentinel(core.keys.partition(customer)))
    return (yield from core._create_balance(customer, name, spec))


def balance_op(
    core: MeterCore,
    customer: str,
    name: str,
    op: str,
    amount: int = 0,
    idempotency_key: str | None = None,
) -> Flow[BalanceState]:
    """Apply topup, withdraw, suspend, resume or read to a balance, once per operation id."""
    yield from core.bootstrap()
    if op in ("topup", "withdraw"):
        check_amount(amount, "amount", positive=True)
    return (yield from core._balance_op(customer, name, op, amount, idempotency_key))


def reserve(
    core: MeterCore,
    customer: str,
    name: str,
    amount: int,
    ttl_s: int,
    idempotency_key: str | None = None,
) -> Flow[tuple[str, int]]:
    """Hold `amount` on a balance for `ttl_s` s; return (reservation id, expiry epoch s).

    With an idempotency key, the reservation id derives from it and the script decides
    duplicates atomically: any number of concurrent retries make one reservation."""
    yield from core.bootstrap()
    check_amount(amount, "amount", positive=True)
    check_amount(ttl_s, "ttl_s", positive=True)
    rid = core.reservation_id(customer, name, idempotency_key)
    expires_ms = int(core.clock() * 1000) + ttl_s * 1000
    reply: list[str] = []
    yield from core._balance_op(
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


def reservation_id(core: MeterCore, customer: str, name: str, idempotency_key: str | None) -> str:
    """Return the id of a reservation: derived from its idempotency key, else random."""
    nonce = None
    if idempotency_key:
        nonce = hashlib.sha256(f"{customer}\x1f{idempotency_key}".encode()).hexdigest()[:16]
    return encode_rid(customer, name, nonce)


def cancel_reservation(
    core: MeterCore, customer: str, name: str, idempotency_key: str
) -> Flow[str]:
    """Undo the reservation made (or still on its way) with `idempotency_key` whose reply was
    lost: release its hold, or void it if it has not arrived. Returns 'voided', 'released'
    or 'closed' (it was committed, released or expired meanwhile)."""
    yield from core.bootstrap()
    rid = core.reservation_id(customer, name, idempotency_key)
    reply: list[str] = []
    try:
        yield from core._balance_op(
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
    core: MeterCore, rid: str, op: str, amount: int = 0, idempotency_key: str | None = None
) -> Flow[BalanceState]:
    """Commit (charge `amount`, release the rest) or release a reservation, exactly once.

    A second close raises Conflict `reservation-closed`; pass an idempotency key to make a
    retry after a timeout return the first result instead."""
    yield from core.bootstrap()
    customer, name = decode_rid(rid)
    if op == "commit":
        check_amount(amount, "amount")
    return (yield from core._balance_op(customer, name, op, amount, idempotency_key, rid=rid))


def _balance_op(
    core: MeterCore,
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
    bkey, bxkey = core.keys.balance(customer, name)
    reply = yield Script(
        "balance",
        (
            core.keys.operation(customer, op_id),
            core.keys.outbox(core.keys.partition(customer)),
            core.keys.customer(customer),
            core.keys.ledger(customer),
            bkey,
            bxkey,
            core.keys.holds(core.keys.partition(customer)),
        ),
        (
            str(int(core.clock() * 1000)),
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
        yield from core.require_data(core.sentinel(core.keys.partition(customer)))
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
        raise Conflict(slug, PROBLEM_DETAIL.get(slug, slug), status=int(status), state=state)
    return state


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
