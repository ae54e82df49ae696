"""Concurrent admissions never overshoot: threads on each backend, two processes on real Redis."""

from __future__ import annotations

import multiprocessing
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.builders import asset, customer, gateway, metric, plan, tier

from metergate import Decision, Meter

NOW = 1_800_000_000.0
THREADS = 16
METERS = 4


def config(tiers: list[dict[str, Any]] | None = None, balance: int | None = None) -> dict[str, Any]:
    """`calls` (Warning past 5, Deny past 10 unless `tiers` says otherwise) for customer `c`."""
    calls = asset(
        *(tiers or [tier(0), tier(5, "Warning"), tier(10, "OverUsage", "Deny")]),
        period="month",
        balance=None if balance is None else "credits",
    )
    return gateway(
        metrics={"calls": metric(), "flight": metric("UpDownCounter")},
        plans={"p": plan(calls=calls, flight=asset(tier(0), tier(4, "OverUsage", "Deny")))},
        customers={"c": customer("p", credits=balance)},
    )


def admit_concurrently(meters: list[Meter], count: int, **kwargs: Any) -> list[Decision]:
    """Run `count` one-unit admissions of `calls` over a thread pool sharing `meters`."""

    # Each meter bootstraps first, one after another: a process whose first bootstrap overlaps
    # another's sees that store half-loaded and answers 503 there until it completes (by design),
    # which is not what these tests are about.
    for meter in meters:
        meter.usage("c", "calls")

    def one(i: int) -> Decision:
        return meters[i % len(meters)].admit("c", {"calls": 1}, **kwargs)

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(one, range(count)))


def outbox_types(meter: Meter) -> Counter[str]:
    """How many events of each type the customer's outbox holds."""
    stream = meter.core.keys.outbox(meter.core.keys.partition("c"))
    return Counter(fields["type"] for _id, fields in meter.storage.client.xrange(stream))


def test_threads_admit_exactly_the_deny_limit(make_meter: Any) -> None:
    """1,000 concurrent one-unit admissions from threads under a Deny limit of 10 admit 10."""
    meters = [make_meter(config()) for _ in range(METERS)]
    decisions = admit_concurrently(meters, 1000)
    assert Counter((d.status, d.problem) for d in decisions) == {
        (200, None): 10,
        (429, "quota-exceeded"): 990,
    }
    assert sorted(d.assets["calls"].value for d in decisions if d.allowed) == list(range(1, 11))
    assert meters[0].usage("c", "calls")["value"] == 10
    assert outbox_types(meters[0]) == {"quota.level_changed": 1}


def _admit_in_process(url: str, count: int, barrier: Any, results: Any) -> None:
    """Child process: a thread pool of Meters admits `count` units once both children are ready."""
    cfg = {**config(), "storage": {"url": url, "timeout_ms": 10_000}}
    meters = [Meter(cfg, clock=lambda: NOW) for _ in range(METERS)]
    for meter in meters:
        meter.usage("c", "calls")  # connect and load the customer before the race starts
    barrier.wait(timeout=60)
    decisions = admit_concurrently(meters, count)
    results.put([(d.status, d.problem) for d in decisions])
    for meter in meters:
        meter.close()


def test_two_processes_admit_exactly_the_deny_limit(redis_server: Any) -> None:
    """1,000 admissions from two processes, each a thread pool of Meters, admit exactly 10."""
    client = redis_server.client()
    client.flushall()
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    children = [
        ctx.Process(target=_admit_in_process, args=(redis_server.url, 500, barrier, results))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    outcomes: Counter[tuple[int, str | None]] = Counter()
    for _ in children:
        outcomes.update(tuple(pair) for pair in results.get(timeout=120))
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    assert outcomes == {(200, None): 10, (429, "quota-exceeded"): 990}
    meter = Meter({**config(), "storage": {"url": redis_server.url}}, clock=lambda: NOW)
    try:
        assert meter.usage("c", "calls")["value"] == 10
        assert outbox_types(meter) == {"quota.level_changed": 1}
    finally:
        meter.close()
        client.close()


def test_concurrent_estimates_never_overshoot_and_settle_past_the_limit(make_meter: Any) -> None:
    """Concurrent estimates of 10 under a Deny limit of 100 hold 10; settling records every one."""
    limit_100 = [
        {"from": 0, "level": "Normal", "policy": "NotifyOnly"},
        {"from": 100, "level": "OverUsage", "policy": "Deny"},
    ]
    meters = [make_meter(config(limit_100)) for _ in range(METERS)]

    def estimate(i: int) -> Decision:
        return meters[i % METERS].admit("c", {}, estimates={"calls": 10})

    with ThreadPoolExecutor(THREADS) as pool:
        decisions = list(pool.map(estimate, range(200)))
    admitted = [d for d in decisions if d.allowed]
    assert len(admitted) == 10
    assert Counter(d.problem for d in decisions if not d.allowed) == {"quota-exceeded": 190}
    usage = meters[0].usage("c", "calls")
    assert (usage["value"], usage["pending"], usage["remaining"]) == (0, 100, 0)

    def settle(i: int) -> Decision:
        ticket = admitted[i].ticket
        assert ticket is not None
        return meters[i % METERS].settle(ticket, {"calls": 12})

    with ThreadPoolExecutor(THREADS) as pool:
        settled = list(pool.map(settle, range(len(admitted))))
    assert all(d.status == 200 for d in settled)
    usage = meters[0].usage("c", "calls")
    assert (usage["value"], usage["pending"], usage["level"]) == (120, 0, "OverUsage")
    assert meters[0].admit("c", {"calls": 1}).problem == "quota-exceeded"
    assert outbox_types(meters[0]) == {"quota.level_changed": 1}


def test_concurrent_admissions_never_overdraw_a_balance(make_meter: Any) -> None:
    """Concurrent priced admissions against a balance of 10 credits admit exactly 10, leaving 0."""
    priced = [{"from": 0, "level": "Normal", "policy": "NotifyOnly", "price": {"per_unit": 1}}]
    meters = [make_meter(config(priced, balance=10)) for _ in range(METERS)]
    decisions = admit_concurrently(meters, 300)
    assert Counter((d.status, d.problem) for d in decisions) == {
        (200, None): 10,
        (402, "insufficient-credits"): 290,
    }
    state = meters[0].balance("c", "credits")
    assert (state.amount, state.held, state.available) == (0, 0, 0)
    assert sum(entry["delta"] for entry in meters[0].ledger("c")) == 0


def test_concurrent_leases_never_exceed_the_in_flight_limit(make_meter: Any) -> None:
    """Threads taking and ending leases never see more than 4 in flight, and leave 0."""
    meters = [make_meter(config()) for _ in range(METERS)]

    def take_and_end(i: int) -> int:
        meter = meters[i % METERS]
        decision = meter.admit("c", {"flight": 1})
        if not decision.allowed:
            assert (decision.status, decision.retry_after) == (429, 1)
            return -1
        assert decision.ticket is not None
        meter.settle(decision.ticket)
        return decision.assets["flight"].value

    with ThreadPoolExecutor(THREADS) as pool:
        seen = list(pool.map(take_and_end, range(200)))
    assert max(seen) <= 4
    assert 1 in seen
    assert meters[0].usage("c", "flight")["value"] == 0
