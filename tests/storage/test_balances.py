"""Prepaid balances on every backend: create once, top up, withdraw, suspend, events, validation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from tests.storage.credits import config, events

from metergate import Conflict, InvalidAmount, Meter, NotFound
from metergate.core.flows import Script

MAX_SAFE = 2**53 - 1
MakeMeter = Callable[..., Meter]


def state(meter: Meter) -> tuple[Any, ...]:
    """Return everything a refused operation must leave alone: balance, ledger and outbox."""
    return meter.balance("c", "credits"), meter.ledger("c", 10_000), events(meter)


def snapshot(client: Any) -> dict[str, Any]:
    """Return the content of every key in the database."""
    readers = {
        "string": client.get,
        "hash": client.hgetall,
        "list": lambda k: client.lrange(k, 0, -1),
        "set": client.smembers,
        "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
        "stream": client.xrange,
    }
    return {key: readers[client.type(key)](key) for key in client.keys("*")}


# -- reading and creating -------------------------------------------------------------------


def test_balance_reports_its_state_and_initial_ledger_entry(make_meter: MakeMeter) -> None:
    """A configured balance reads back its amount, settings and one `initial` ledger entry."""
    meter = make_meter(config())
    assert meter.balance("c", "credits").as_dict() == {
        "amount": 100,
        "held": 0,
        "available": 100,
        "overage": 20,
        "unit": "credits",
        "suspended": False,
        "low_at": 30,
    }
    [entry] = meter.ledger("c")
    assert (entry["kind"], entry["balance"], entry["delta"], entry["amount"], entry["held"]) == (
        "initial",
        "credits",
        100,
        100,
        0,
    )
    assert events(meter) == []


def test_unknown_balance_raises_not_found(make_meter: MakeMeter) -> None:
    """Reading or moving credit on a balance that does not exist raises NotFound."""
    meter = make_meter(config())
    with pytest.raises(NotFound):
        meter.balance("c", "nope")
    with pytest.raises(NotFound):
        meter.topup("c", "nope", 5)
    with pytest.raises(NotFound):
        meter.withdraw("c", "nope", 5)
    with pytest.raises(NotFound):
        meter.reserve("c", "nope", 5, 60)
    assert meter.ledger("c")[0]["kind"] == "initial" and len(meter.ledger("c")) == 1


def test_create_balance_writes_a_new_amount_once(make_meter: MakeMeter) -> None:
    """A new balance's amount is written as an `initial` entry; creating it again keeps it."""
    meter = make_meter(config())
    assert meter.create_balance("c", "bonus", {"amount": 7}).amount == 7
    assert meter.create_balance("c", "bonus", {"amount": 9}).amount == 7
    bonus = [e for e in meter.ledger("c") if e["balance"] == "bonus"]
    assert [(e["kind"], e["delta"]) for e in bonus] == [("initial", 7)]


def test_create_balance_never_resets_an_existing_amount(make_meter: MakeMeter) -> None:
    """create_balance on an existing balance keeps the amount that changed at runtime."""
    meter = make_meter(config())
    meter.topup("c", "credits", 5)
    again = meter.create_balance("c", "credits", {"amount": 999, "overage": 20, "low_at": 30})
    assert (again.amount, again.available) == (105, 105)
    assert meter.balance("c", "credits").amount == 105
    assert [e["kind"] for e in meter.ledger("c")] == ["topup", "initial"]


def test_second_meter_with_the_same_config_keeps_runtime_changes(make_meter: MakeMeter) -> None:
    """A second Meter starting over the same storage and config never resets the amount."""
    first = make_meter(config())
    first.withdraw("c", "credits", 40)
    first.suspend_balance("c", "credits")
    second = make_meter(config())
    balance = second.balance("c", "credits")
    assert (balance.amount, balance.suspended) == (60, True)
    assert [e["kind"] for e in second.ledger("c")] == ["suspend", "withdraw", "initial"]


def test_second_meter_keeps_balance_settings_changed_at_runtime(make_meter: MakeMeter) -> None:
    """Overage and low_at changed at runtime survive a restart with the original config."""
    first = make_meter(config())
    first.create_balance("c", "credits", {"amount": 100, "overage": 50, "low_at": 10})
    balance = make_meter(config()).balance("c", "credits")
    assert (balance.overage, balance.low_at) == (50, 10)


# -- top-up and withdrawal -------------------------------------------------------------------


def test_topup_adds_credit_and_emits_topped_up(make_meter: MakeMeter) -> None:
    """A top-up adds to the amount, appends a ledger entry and emits `balance.topped_up` once."""
    meter = make_meter(config())
    after = meter.topup("c", "credits", 5)
    assert (after.amount, after.held, after.available) == (105, 0, 105)
    entry = meter.ledger("c")[0]
    assert (entry["kind"], entry["delta"], entry["amount"], entry["held"]) == ("topup", 5, 105, 0)
    assert events(meter) == [
        (
            "balance.topped_up",
            {"customer": "c", "balance": "credits", "amount": 5, "balance_after": 105, "seq": 1},
        )
    ]


def test_topup_reaches_the_largest_safe_integer(make_meter: MakeMeter) -> None:
    """A top-up may bring the amount to exactly 2^53 - 1."""
    meter = make_meter(config())
    assert meter.topup("c", "credits", MAX_SAFE - 100).amount == MAX_SAFE
    assert meter.ledger("c")[0]["amount"] == MAX_SAFE


def test_topup_beyond_the_largest_safe_integer_is_invalid_amount(make_meter: MakeMeter) -> None:
    """A top-up taking the amount past 2^53 - 1 raises InvalidAmount and changes nothing."""
    meter = make_meter(config())
    meter.topup("c", "credits", MAX_SAFE - 100)
    before = state(meter)
    with pytest.raises(InvalidAmount) as info:
        meter.topup("c", "credits", 1)
    assert info.value.field == "amount"
    assert state(meter) == before


def test_withdraw_takes_credit_down_to_exactly_zero(make_meter: MakeMeter) -> None:
    """Withdrawing everything leaves 0 and emits withdrawn, low and depleted once each."""
    meter = make_meter(config())
    after = meter.withdraw("c", "credits", 100)
    assert (after.amount, after.available) == (0, 0)
    entry = meter.ledger("c")[0]
    assert (entry["kind"], entry["delta"], entry["amount"]) == ("withdraw", -100, 0)
    assert events(meter) == [
        (
            "balance.withdrawn",
            {"customer": "c", "balance": "credits", "amount": 100, "balance_after": 0, "seq": 1},
        ),
        (
            "balance.low",
            {"customer": "c", "balance": "credits", "amount": 0, "floor": -20, "seq": 2},
        ),
        (
            "balance.depleted",
            {"customer": "c", "balance": "credits", "amount": 0, "floor": -20, "seq": 3},
        ),
    ]


def test_withdraw_below_zero_is_refused_despite_overage(make_meter: MakeMeter) -> None:
    """A withdrawal past 0 available is Conflict 409 insufficient-credits and changes nothing."""
    meter = make_meter(config())
    before = state(meter)
    with pytest.raises(Conflict) as info:
        meter.withdraw("c", "credits", 101)
    assert (info.value.slug, info.value.status) == ("insufficient-credits", 409)
    assert state(meter) == before


def test_withdraw_cannot_take_held_credit(make_meter: MakeMeter) -> None:
    """Credit held by a reservation cannot be withdrawn: only `available` can."""
    meter = make_meter(config())
    meter.reserve("c", "credits", 30, 60)
    with pytest.raises(Conflict) as info:
        meter.withdraw("c", "credits", 71)
    assert info.value.slug == "insufficient-credits"
    after = meter.withdraw("c", "credits", 70)
    assert (after.amount, after.held, after.available) == (30, 30, 0)


def test_topup_and_withdraw_apply_once_per_idempotency_key(make_meter: MakeMeter) -> None:
    """Replaying a key changes nothing more; the same key with another amount is a Conflict."""
    meter = make_meter(config())
    assert meter.topup("c", "credits", 10, idempotency_key="t1").amount == 110
    assert meter.topup("c", "credits", 10, idempotency_key="t1").amount == 110
    assert meter.withdraw("c", "credits", 4, idempotency_key="w1").amount == 106
    assert meter.withdraw("c", "credits", 4, idempotency_key="w1").amount == 106
    replays: list[Callable[[], object]] = [
        lambda: meter.topup("c", "credits", 11, "t1"),
        lambda: meter.withdraw("c", "credits", 10, "t1"),
    ]
    for replay in replays:
        with pytest.raises(Conflict) as info:
            replay()
        assert (info.value.slug, info.value.status) == ("idempotency-conflict", 409)
    assert meter.balance("c", "credits").amount == 106
    assert [e["kind"] for e in meter.ledger("c")] == ["withdraw", "topup", "initial"]
    assert [t for t, _ in events(meter)] == ["balance.topped_up", "balance.withdrawn"]


# -- low and depleted ------------------------------------------------------------------------


def test_low_fires_once_per_fall_below_low_at(make_meter: MakeMeter) -> None:
    """`balance.low` fires when available falls from >= low_at to below it, once per crossing."""
    meter = make_meter(config())
    meter.withdraw("c", "credits", 70)  # 100 -> 30: not below 30
    meter.withdraw("c", "credits", 1)  # 30 -> 29: low
    meter.withdraw("c", "credits", 9)  # 29 -> 20: already low
    meter.topup("c", "credits", 20)  # 20 -> 40
    meter.withdraw("c", "credits", 15)  # 40 -> 25: low again
    low = [data for kind, data in events(meter) if kind == "balance.low"]
    assert [(d["amount"], d["floor"]) for d in low] == [(29, -20), (25, -20)]


def test_depleted_fires_once_per_fall_to_zero_or_below(make_meter: MakeMeter) -> None:
    """`balance.depleted` fires when available falls from above 0 to <= 0, once per crossing."""
    meter = make_meter(config())
    meter.withdraw("c", "credits", 100)  # 100 -> 0: depleted
    meter.topup("c", "credits", 3)
    assert meter.admit("c", {"calls": 5}).balances == {"credits": -2}  # 3 -> -2: depleted
    assert meter.admit("c", {"calls": 1}).balances == {"credits": -3}  # already depleted
    depleted = [data for kind, data in events(meter) if kind == "balance.depleted"]
    assert [(d["amount"], d["floor"]) for d in depleted] == [(0, -20), (-2, -20)]
    assert "balance.overdrawn" not in [kind for kind, _ in events(meter)]


# -- suspension ------------------------------------------------------------------------------


def test_suspend_and_resume_each_change_state_once(make_meter: MakeMeter) -> None:
    """Suspend and resume flip the flag and emit their event once; repeating them does nothing."""
    meter = make_meter(config())
    assert meter.suspend_balance("c", "credits").suspended is True
    assert meter.suspend_balance("c", "credits").suspended is True
    assert meter.resume_balance("c", "credits").suspended is False
    assert meter.resume_balance("c", "credits").suspended is False
    assert events(meter) == [
        ("balance.suspended", {"customer": "c", "balance": "credits", "seq": 1}),
        ("balance.resumed", {"customer": "c", "balance": "credits", "seq": 2}),
    ]
    assert [(e["kind"], e["delta"]) for e in meter.ledger("c")] == [
        ("resume", 0),
        ("suspend", 0),
        ("initial", 100),
    ]


def test_admission_charging_a_suspended_balance_is_403(make_meter: MakeMeter) -> None:
    """An admission charging a suspended balance is 403 balance-suspended and records nothing."""
    meter = make_meter(config())
    meter.suspend_balance("c", "credits")
    before = state(meter)
    refused = meter.admit("c", {"calls": 1})
    assert (refused.allowed, refused.status, refused.problem) == (False, 403, "balance-suspended")
    assert refused.assets["calls"].value == 0
    assert state(meter) == before
    meter.resume_balance("c", "credits")
    allowed = meter.admit("c", {"calls": 1})
    assert (allowed.status, allowed.assets["calls"].value, allowed.balances) == (
        200,
        1,
        {"credits": 99},
    )


# -- validation ------------------------------------------------------------------------------

BAD_AMOUNTS = [5.5, "5.5", math.nan, math.inf, -1, 2**53, True]
Operation = Callable[[Meter, str, Any], object]
OPERATIONS: dict[str, tuple[str, Operation]] = {
    "topup": ("amount", lambda m, rid, v: m.topup("c", "credits", v)),
    "withdraw": ("amount", lambda m, rid, v: m.withdraw("c", "credits", v)),
    "reserve": ("amount", lambda m, rid, v: m.reserve("c", "credits", v, 60)),
    "reserve-ttl": ("ttl_s", lambda m, rid, v: m.reserve("c", "credits", 1, v)),
    "commit": ("amount", lambda m, rid, v: m.commit(rid, v)),
    "admit": ("amounts.calls", lambda m, rid, v: m.admit("c", {"calls": v})),
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_bad_amounts_are_invalid_and_change_nothing(make_meter: MakeMeter, operation: str) -> None:
    """Floats, numeric strings, NaN, inf, negatives, 2^53 and bools raise InvalidAmount(field)."""
    meter = make_meter(config())
    field, call = OPERATIONS[operation]
    rid = meter.reserve("c", "credits", 1, 60)
    before = state(meter)
    for value in BAD_AMOUNTS:
        with pytest.raises(InvalidAmount) as info:
            call(meter, rid, value)
        assert info.value.field == field, value
    assert state(meter) == before


@pytest.mark.parametrize("operation", ["topup", "withdraw", "reserve", "reserve-ttl"])
def test_zero_is_invalid_where_a_positive_amount_is_needed(
    make_meter: MakeMeter, operation: str
) -> None:
    """Top-ups, withdrawals and holds of 0 (or a 0 s ttl) raise InvalidAmount and change nothing."""
    meter = make_meter(config())
    field, call = OPERATIONS[operation]
    before = state(meter)
    with pytest.raises(InvalidAmount) as info:
        call(meter, "", 0)
    assert info.value.field == field
    assert state(meter) == before


def test_create_balance_with_a_bad_amount_is_invalid_amount(make_meter: MakeMeter) -> None:
    """create_balance with a non-integer or out-of-range amount raises InvalidAmount(amount)."""
    meter = make_meter(config())
    before = state(meter)
    for value in BAD_AMOUNTS:
        with pytest.raises(InvalidAmount) as info:
            meter.create_balance("c", "credits", {"amount": value})
        assert info.value.field == "amount", value
    assert state(meter) == before


def balance_script(meter: Meter, op: str, amount: str, **argv: str) -> Script:
    """Build a raw `balance` script call for customer c's `credits`, with any ARGV overridden."""
    keys = meter.core.keys
    args = {
        "now": str(int(meter.core.clock() * 1000)),
        "op_id": "k:raw",
        "fingerprint": f"{op}:credits:{amount}",
        "ttl": "86400",
        "customer": "c",
        "op": op,
        "name": "credits",
        "amount": amount,
        "rid": "rsv_raw",
        "expiry": str(int(meter.core.clock() * 1000) + 60_000),
        "unit": "credits",
        "overage": "20",
        "low_at": "30",
    }
    args.update(argv)
    return Script(
        "balance",
        (
            keys.operation("c", args["op_id"]),
            keys.outbox(keys.partition("c")),
            keys.customer("c"),
            keys.ledger("c"),
            *keys.balance("c", "credits"),
        ),
        tuple(args.values()),
    )


BAD_STRINGS = [
    "5.5",
    "1.0",
    "nan",
    "inf",
    "-inf",
    "1e3",
    "0x10",
    "-1",
    "9007199254740992",
    "",
    " 5",
    "+5",
]


@pytest.mark.parametrize("op", ["topup", "withdraw", "reserve", "commit", "create"])
def test_balance_script_rejects_bad_amount_strings_and_writes_nothing(
    make_meter: MakeMeter, op: str
) -> None:
    """The balance script itself rejects every non-integer amount string before writing anything."""
    meter = make_meter(config())
    meter.reserve("c", "credits", 1, 60)
    client = meter.storage.client
    before = snapshot(client)
    for bad in BAD_STRINGS:
        with pytest.raises(InvalidAmount) as info:
            meter.storage.run(balance_script(meter, op, bad))
        assert info.value.field == "amount", bad
        assert snapshot(client) == before, bad


BAD_ARGUMENTS: list[tuple[str, dict[str, str], str]] = [
    ("topup", {"now": "1.5"}, "now"),
    ("topup", {"ttl": "0"}, "ttl"),
    ("topup", {"ttl": "nan"}, "ttl"),
    ("reserve", {"expiry": "inf"}, "expiry"),
    ("reserve", {"expiry": "1800000000000"}, "expiry"),
    ("reserve", {"rid": ""}, "reservation"),
    ("commit", {"rid": ""}, "reservation"),
    ("bogus", {}, "operation"),
    ("create", {"overage": "-1"}, "overage"),
    ("create", {"overage": "2.5"}, "overage"),
    ("create", {"low_at": "-5"}, "low_at"),
    ("create", {"low_at": "nan"}, "low_at"),
]


def test_balance_script_rejects_bad_arguments_and_writes_nothing(make_meter: MakeMeter) -> None:
    """The balance script names a malformed header, operation or setting and writes nothing."""
    meter = make_meter(config())
    client = meter.storage.client
    before = snapshot(client)
    for op, argv, field in BAD_ARGUMENTS:
        with pytest.raises(InvalidAmount) as info:
            meter.storage.run(balance_script(meter, op, "5", **argv))
        assert info.value.field == field, (op, argv)
        assert snapshot(client) == before, (op, argv)


def test_balance_script_refuses_an_overflowing_topup_before_any_write(
    make_meter: MakeMeter, clock: Any
) -> None:
    """A top-up past 2^53 - 1 is refused before any write, even with an expired hold due."""
    meter = make_meter(config())
    meter.topup("c", "credits", MAX_SAFE - 100)
    meter.reserve("c", "credits", 1, 1)
    clock.advance(5)
    client = meter.storage.client
    before = snapshot(client)
    with pytest.raises(InvalidAmount) as info:
        meter.storage.run(balance_script(meter, "topup", "1"))
    assert info.value.field == "amount"
    assert snapshot(client) == before


def test_admit_script_rejects_bad_amount_strings_and_writes_nothing(
    make_meter: MakeMeter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Python's check bypassed, the admission script rejects bad amounts, writing nothing."""
    import metergate.core.admissions as admissions

    meter = make_meter(config())
    meter.balance("c", "credits")
    client = meter.storage.client
    before = snapshot(client)
    monkeypatch.setattr(admissions, "check_amount", lambda value, *_a, **_k: value)
    for bad in ["5.5", "nan", "inf", "-1", "9007199254740992", "True", "1e3"]:
        with pytest.raises(InvalidAmount) as info:
            meter.admit("c", {"calls": bad})  # type: ignore[dict-item]
        assert info.value.field == "amount", bad
        assert snapshot(client) == before, bad


def test_balance_script_refuses_to_reuse_a_live_hold_id(make_meter: MakeMeter) -> None:
    """A second hold under a live hold's id is refused: the first is never silently overwritten."""
    meter = make_meter(config())
    meter.balance("c", "credits")  # loads the configured customer
    meter.storage.run(balance_script(meter, "reserve", "5", op_id="k:first"))
    reply = meter.storage.run(balance_script(meter, "reserve", "7", op_id="k:second"))
    assert reply[:2] == ["409", "reservation-exists"]
    assert meter.balance("c", "credits").held == 5


def test_balance_script_create_can_leave_existing_settings_alone(make_meter: MakeMeter) -> None:
    """`create` updates an existing balance's settings; with only-if-missing it leaves them."""
    meter = make_meter(config())
    meter.balance("c", "credits")  # loads the configured customer
    run = meter.storage.run
    run(balance_script(meter, "create", "9", op_id="create:credits", overage="5", low_at=""))
    balance = meter.balance("c", "credits")
    assert (balance.amount, balance.overage, balance.low_at) == (100, 5, None)
    keep = balance_script(meter, "create", "9", op_id="create:credits", overage="7")
    run(Script(keep.name, keep.keys, (*keep.args, "1")))
    balance = meter.balance("c", "credits")
    assert (balance.amount, balance.overage, balance.low_at) == (100, 5, None)
