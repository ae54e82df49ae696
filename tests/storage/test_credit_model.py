"""A state machine over one prepaid balance, checked after every step against a Python model."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from metergate import Conflict, Meter
from metergate.periods import period_window

MakeMeter = Callable[..., Meter]
DAY = 86_400

# units 1-6 cost 1 each; 7-15 cost 3 per 2 units + base 4; from 16 on, 2 each + base 1
TIERS: list[dict[str, Any]] = [
    {"from": 0, "price": {"per_unit": 1}},
    {"from": 6, "price": {"per_unit": 3, "per": 2, "base": 4}},
    {"from": 15, "price": {"per_unit": 2, "base": 1}},
]
CONFIG: dict[str, Any] = {
    "metrics": {"calls": {"type": "CumulativeCounter"}},
    "plans": {
        "p": {
            "assets": {
                "calls": {
                    "period": "month",
                    "balance": "credits",
                    "tiers": [{"level": "Normal", "policy": "NotifyOnly", **t} for t in TIERS],
                }
            }
        }
    },
}


def price_of(total: int) -> int:
    """The closed-form price of `total` units in one period, bases included."""
    price = 0
    for k, tier in enumerate(TIERS):
        top = TIERS[k + 1]["from"] if k + 1 < len(TIERS) else total
        units = max(0, min(total, top) - tier["from"])
        if units:
            p = tier["price"]
            price += math.ceil(units * p["per_unit"] / p.get("per", 1)) + p.get("base", 0)
    return price


def credits(low: int, high: int) -> st.SearchStrategy[int]:
    """Amounts in [low, high], often multiples of 5 so that exact boundaries (low_at) occur."""
    multiples_of_5 = st.integers(-(-low // 5), high // 5).map(lambda k: 5 * k)
    return st.integers(low, high) | multiples_of_5


Event = tuple[str, dict[str, Any]]
Entry = tuple[str, int, int, int]


@dataclass
class Model:
    """The plain Python reference: one balance, its holds, the priced counter, ledger and events."""

    amount: int
    overage: int
    low_at: int
    suspended: bool = False
    holds: dict[str, tuple[int, int]] = field(default_factory=dict)  # rid -> (amount, expiry ms)
    value: int = 0
    period: int = -1
    overdrawn_by_commit: bool = False
    """Set by a commit larger than its hold that took `available` below the floor."""
    ledger: list[Entry] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def held(self) -> int:
        return sum(amount for amount, _ in self.holds.values())

    @property
    def available(self) -> int:
        return self.amount - self.held

    usage_window: int | None = None
    """The usage report window of the last ledger line while it is a usage line."""

    def record(self, kind: str, delta: int, window: int | None = None) -> None:
        if kind == "usage" and window is not None and window == self.usage_window:
            # charges of one window join one usage line, as long as nothing came between
            _, total, _, _ = self.ledger[-1]
            self.ledger[-1] = (kind, total + delta, self.amount, self.held)
            return
        self.usage_window = window if kind == "usage" else None
        self.ledger.append((kind, delta, self.amount, self.held))

    def emit(self, etype: str, **data: Any) -> None:
        self.events.append((etype, {"balance": "credits", **data}))

    def expire(self, now_ms: int) -> None:
        """Release every hold due at `now_ms`, in expiry then id order, as the scripts do."""
        due = sorted((exp, rid) for rid, (_, exp) in self.holds.items() if exp <= now_ms)
        for _, rid in due:
            amount, _ = self.holds.pop(rid)
            self.record("expire", 0)
            self.emit("reservation.expired", reservation=rid, amount=amount)

    def moved(self, before: int) -> None:
        """Emit the lifecycle events of `available` moving from `before` to now."""
        after, floor = self.available, -self.overage
        if before >= self.low_at > after:
            self.emit("balance.low", amount=after, floor=floor)
        if before > 0 >= after:
            self.emit("balance.depleted", amount=after, floor=floor)
        if before >= floor > after:
            self.emit("balance.overdrawn", amount=after, floor=floor)


def test_balance_matches_the_model_after_every_step(
    make_meter: MakeMeter, clock: Any, storage_url: str
) -> None:
    """Random top-ups, withdrawals, admissions, holds, closes and expiries match the model."""
    meter = make_meter(CONFIG)
    client = meter.storage.client

    class CreditMachine(RuleBasedStateMachine):
        rids = Bundle("rids")

        def __init__(self) -> None:
            super().__init__()
            self.customer = f"m{uuid.uuid4().hex[:12]}"
            keys = meter.core.keys
            self.outbox = keys.outbox(keys.partition(self.customer))
            last = client.xrevrange(self.outbox, count=1)
            self.seen = last[0][0] if last else "0-0"
            self.seq = 0
            self.events: list[Event] = []
            self.model = Model(0, 0, 0)

        def now_ms(self) -> int:
            return int(clock() * 1000)

        @initialize(
            amount=credits(0, 100),
            overage=credits(0, 30),
            low_at=credits(0, 80),
        )
        def create(self, amount: int, overage: int, low_at: int) -> None:
            balance = {"amount": amount, "overage": overage, "low_at": low_at}
            meter.put_customer(
                self.customer, {"entitlement": {"plan": "p"}, "balances": {"credits": balance}}
            )
            self.model = Model(amount, overage, low_at)
            self.model.record("initial", amount)

        @rule(n=credits(1, 60))
        def topup(self, n: int) -> None:
            m = self.model
            m.expire(self.now_ms())
            meter.topup(self.customer, "credits", n)
            m.amount += n
            m.record("topup", n)
            m.emit("balance.topped_up", amount=n, balance_after=m.amount)

        @rule(n=credits(1, 80))
        def withdraw(self, n: int) -> None:
            m = self.model
            m.expire(self.now_ms())
            if m.available - n < 0:
                with_conflict(
                    lambda: meter.withdraw(self.customer, "credits", n), 409, "insufficient-credits"
                )
                return
            meter.withdraw(self.customer, "credits", n)
            before = m.available
            m.amount -= n
            m.record("withdraw", -n)
            m.emit("balance.withdrawn", amount=n, balance_after=m.amount)
            m.moved(before)

        @rule(n=st.integers(0, 8))
        def admit(self, n: int) -> None:
            m = self.model
            now_s = clock()
            m.expire(self.now_ms())
            start, _ = period_window("month", now_s)
            value = 0 if start != m.period else m.value
            charge = price_of(value + n) - price_of(value)
            decision = meter.admit(self.customer, {"calls": n})
            if m.suspended:
                assert (decision.status, decision.problem) == (403, "balance-suspended")
                assert decision.assets["calls"].value == value
            elif charge > 0 and m.available - charge < -m.overage:
                assert (decision.status, decision.problem) == (402, "insufficient-credits")
                assert decision.assets["calls"].value == value
            else:
                assert decision.status == 200, decision
                m.period, m.value = start, value + n
                if charge > 0:
                    before = m.available
                    m.amount -= charge
                    now_ms = self.now_ms()
                    m.record("usage", -charge, now_ms - now_ms % 60_000)
                    m.moved(before)
                assert decision.assets["calls"].value == m.value
            assert decision.balances == {"credits": m.available}

        @rule(target=rids, n=credits(1, 40), ttl=st.sampled_from([10, 20, 30, 60]))
        def reserve(self, n: int, ttl: int) -> Any:
            m = self.model
            m.expire(self.now_ms())

            def call() -> str:
                return meter.reserve(self.customer, "credits", n, ttl)

            if m.suspended:
                with_conflict(call, 403, "balance-suspended")
                return multiple()
            if m.available - n < -m.overage:
                with_conflict(call, 402, "insufficient-credits")
                return multiple()
            rid = call()
            before = m.available
            m.holds[rid] = (n, self.now_ms() + ttl * 1000)
            m.record("hold", 0)
            m.moved(before)
            return rid

        @rule(rid=consumes(rids), n=credits(0, 50))
        def commit(self, rid: str, n: int) -> None:
            m = self.model
            m.expire(self.now_ms())
            if rid not in m.holds:
                with_conflict(lambda: meter.commit(rid, n), 409, "reservation-closed")
                return
            meter.commit(rid, n)
            before = m.available
            held, _ = m.holds.pop(rid)
            m.amount -= n
            m.record("commit", -n)
            if n > held and m.available < -m.overage:
                m.overdrawn_by_commit = True
            m.moved(before)

        @rule(rid=consumes(rids))
        def release(self, rid: str) -> None:
            m = self.model
            m.expire(self.now_ms())
            if rid not in m.holds:
                with_conflict(lambda: meter.release(rid), 409, "reservation-closed")
                return
            meter.release(rid)
            m.holds.pop(rid)
            m.record("release", 0)

        @rule()
        def toggle_suspension(self) -> None:
            m = self.model
            m.expire(self.now_ms())
            if m.suspended:
                meter.resume_balance(self.customer, "credits")
            else:
                meter.suspend_balance(self.customer, "credits")
            m.suspended = not m.suspended
            m.record("suspend" if m.suspended else "resume", 0)
            m.emit("balance.suspended" if m.suspended else "balance.resumed")

        @rule(seconds=st.sampled_from([1, 5, 10, 20, 30]))
        def wait(self, seconds: int) -> None:
            clock.advance(seconds)

        @rule(days=st.integers(10, 40))
        def wait_for_another_period(self, days: int) -> None:
            clock.advance(days * DAY)

        @invariant()
        def matches_the_model(self) -> None:
            m = self.model
            if not m.ledger:
                return  # before create
            m.expire(self.now_ms())
            state = meter.balance(self.customer, "credits")
            assert (state.amount, state.held, state.available, state.suspended) == (
                m.amount,
                m.held,
                m.available,
                m.suspended,
            )
            # one round trip for the ledger and the new outbox entries keeps the machine fast
            entries = list(reversed(meter.ledger(self.customer, 10_000)))
            new_entries = client.xrange(self.outbox, min="(" + self.seen)
            assert [(e["kind"], e["delta"], e["amount"], e["held"]) for e in entries] == m.ledger
            assert entries[0]["kind"] == "initial"
            assert state.amount == sum(e["delta"] for e in entries)
            if state.available >= -m.overage:
                m.overdrawn_by_commit = False
            else:
                assert m.overdrawn_by_commit, "only a commit above its hold may pass the floor"
            for entry_id, fields in new_entries:
                self.seen = entry_id
                if fields["customer"] == self.customer:
                    data = json.loads(fields["data"])
                    self.seq += 1
                    assert (data.pop("customer"), data.pop("seq")) == (self.customer, self.seq)
                    # the counter's period closes are the worker suite's subject, not the balance's
                    if fields["type"] != "period.closed":
                        self.events.append((fields["type"], data))
            assert self.events == m.events

    # scripts run ~10x slower embedded, and the Cluster client costs more: fewer examples there
    backend = storage_url.split(":", 1)[0].removeprefix("redis+")
    run_state_machine_as_test(
        CreditMachine,
        settings=settings(
            max_examples={"memory": 15, "cluster": 15}.get(backend, 30),
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def with_conflict(call: Callable[[], object], status: int, slug: str) -> None:
    """Assert that `call` raises Conflict with this status and slug."""
    with pytest.raises(Conflict) as info:
        call()
    assert (info.value.status, info.value.slug) == (status, slug)
