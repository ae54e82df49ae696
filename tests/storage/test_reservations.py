"""Reservations on every backend: hold, commit, release, expiry, closing once, concurrency."""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from tests.storage.credits import config, events

from metergate import Conflict, Meter

MakeMeter = Callable[..., Meter]
TTL_S = 60


def kinds(meter: Meter) -> list[str]:
    """Return the kinds of customer c's ledger entries, newest first."""
    return [e["kind"] for e in meter.ledger("c", 10_000)]


def amounts(meter: Meter) -> tuple[int, int, int]:
    """Return (amount, held, available) of customer c's `credits`."""
    b = meter.balance("c", "credits")
    return b.amount, b.held, b.available


# -- holding ---------------------------------------------------------------------------------


def test_reserve_holds_credit_without_charging_it(make_meter: MakeMeter) -> None:
    """A reservation raises `held` and lowers `available`, not `amount`, and logs a `hold`."""
    meter = make_meter(config())
    rid = meter.reserve("c", "credits", 30, TTL_S)
    assert rid.startswith("rsv_")
    assert amounts(meter) == (100, 30, 70)
    entry = meter.ledger("c")[0]
    assert (entry["kind"], entry["op"], entry["delta"], entry["held"]) == ("hold", rid, 0, 30)


def test_reserve_up_to_available_plus_overage_and_402_beyond(make_meter: MakeMeter) -> None:
    """A hold may take available to exactly -overage; one more credit is Conflict 402, no change."""
    meter = make_meter(config())
    meter.reserve("c", "credits", 120, TTL_S)
    assert amounts(meter) == (100, 120, -20)
    before = amounts(meter), kinds(meter), events(meter)
    with pytest.raises(Conflict) as info:
        meter.reserve("c", "credits", 1, TTL_S)
    assert (info.value.status, info.value.slug) == (402, "insufficient-credits")
    assert (amounts(meter), kinds(meter), events(meter)) == before
    assert [t for t, _ in events(meter)] == ["balance.low", "balance.depleted"]


def test_reserve_on_a_suspended_balance_is_403(make_meter: MakeMeter) -> None:
    """A suspended balance refuses holds with Conflict 403 balance-suspended."""
    meter = make_meter(config())
    meter.suspend_balance("c", "credits")
    with pytest.raises(Conflict) as info:
        meter.reserve("c", "credits", 1, TTL_S)
    assert (info.value.status, info.value.slug) == (403, "balance-suspended")
    assert amounts(meter) == (100, 0, 100)


# -- closing ---------------------------------------------------------------------------------


def test_commit_less_than_the_hold_releases_the_rest(make_meter: MakeMeter) -> None:
    """Committing less than the hold charges the actual amount and frees the remainder."""
    meter = make_meter(config())
    rid = meter.reserve("c", "credits", 30, TTL_S)
    after = meter.commit(rid, 12)
    assert (after.amount, after.held, after.available) == (88, 0, 88)
    entry = meter.ledger("c")[0]
    assert (entry["kind"], entry["delta"], entry["amount"], entry["held"]) == ("commit", -12, 88, 0)
    assert events(meter) == []


def test_commit_of_zero_charges_nothing(make_meter: MakeMeter) -> None:
    """Committing 0 closes the hold without charging anything."""
    meter = make_meter(config())
    rid = meter.reserve("c", "credits", 30, TTL_S)
    assert (meter.commit(rid, 0).amount, meter.balance("c", "credits").held) == (100, 0)


def test_commit_more_than_the_hold_charges_in_full_and_overdraws(make_meter: MakeMeter) -> None:
    """A commit above the hold charges it all, may pass the floor, and emits `balance.overdrawn`."""
    meter = make_meter(config())
    rid = meter.reserve("c", "credits", 120, TTL_S)
    after = meter.commit(rid, 130)
    assert (after.amount, after.held, after.available) == (-30, 0, -30)
    assert meter.ledger("c")[0]["delta"] == -130
    assert events(meter)[-1] == (
        "balance.overdrawn",
        {"customer": "c", "balance": "credits", "amount": -30, "floor": -20, "seq": 3},
    )
    assert [t for t, _ in events(meter)].count("balance.overdrawn") == 1


def test_commit_more_than_the_hold_within_the_floor_does_not_overdraw(
    make_meter: MakeMeter,
) -> None:
    """A commit above its hold that stays above -overage emits low and depleted, not overdrawn."""
    meter = make_meter(config())
    rid = meter.reserve("c", "credits", 10, TTL_S)
    assert meter.commit(rid, 110).available == -10
    assert [(t, d["amount"]) for t, d in events(meter)] == [
        ("balance.low", -10),
        ("balance.depleted", -10),
    ]


def test_release_returns_the_whole_hold(make_meter: MakeMeter) -> None:
    """Releasing a hold makes its credit available again and charges nothing."""
    meter = make_meter(config())
    rid = meter.reserve("c", "credits", 30, TTL_S)
    after = meter.release(rid)
    assert (after.amount, after.held, after.available) == (100, 0, 100)
    assert kinds(meter) == ["release", "hold", "initial"]


@pytest.mark.parametrize(
    ("first", "second"),
    [("commit", "commit"), ("commit", "commit-other"), ("release", "release")],
)
def test_closing_a_reservation_twice_is_a_conflict(
    make_meter: MakeMeter, first: str, second: str
) -> None:
    """A second commit or release of a closed reservation raises Conflict reservation-closed."""
    meter = make_meter(config())
    rid = meter.reserve("c", "credits", 30, TTL_S)
    close = {
        "commit": lambda: meter.commit(rid, 5),
        "commit-other": lambda: meter.commit(rid, 7),
        "release": lambda: meter.release(rid),
    }
    close[first]()
    with pytest.raises(Conflict) as info:
        close[second]()
    assert (info.value.slug, info.value.status) == ("reservation-closed", 409)


@pytest.mark.parametrize(("first", "second"), [("release", "commit"), ("commit", "release")])
def test_closing_a_reservation_the_other_way_is_a_conflict(
    make_meter: MakeMeter, first: str, second: str
) -> None:
    """A commit after a release, or a release after a commit, raises Conflict reservation-closed."""
    meter = make_meter(config())
    rid = meter.reserve("c", "credits", 30, TTL_S)
    close = {"commit": lambda: meter.commit(rid, 5), "release": lambda: meter.release(rid)}
    close[first]()
    before = amounts(meter), kinds(meter)
    with pytest.raises(Conflict) as info:
        close[second]()
    assert (info.value.slug, info.value.status) == ("reservation-closed", 409)
    assert (amounts(meter), kinds(meter)) == before


def test_repeated_closes_move_credit_exactly_once(make_meter: MakeMeter) -> None:
    """However often a reservation is committed or released, one charge and close are recorded."""
    meter = make_meter(config())
    rid = meter.reserve("c", "credits", 30, TTL_S)
    meter.commit(rid, 5)
    closes: list[Callable[[], object]] = [
        lambda: meter.commit(rid, 5),
        lambda: meter.commit(rid, 9),
        lambda: meter.release(rid),
    ]
    for close in closes:
        with contextlib.suppress(Conflict):
            close()
    assert amounts(meter) == (95, 0, 95)
    assert kinds(meter) == ["commit", "hold", "initial"]


# -- expiry ----------------------------------------------------------------------------------


def test_expired_hold_stops_counting_at_its_expiry(make_meter: MakeMeter, clock: Any) -> None:
    """A hold counts until `ttl_s` has passed and no longer, without waiting for any sweep."""
    meter = make_meter(config())
    meter.reserve("c", "credits", 30, 10)
    clock.advance(9)
    assert amounts(meter) == (100, 30, 70)
    clock.advance(1)
    assert amounts(meter) == (100, 0, 100)


def test_expired_hold_frees_credit_for_the_next_admission(
    make_meter: MakeMeter, clock: Any
) -> None:
    """An admission refused for a hold is allowed once the hold expires, emitting the expiry."""
    meter = make_meter(config(overage=0))
    rid = meter.reserve("c", "credits", 100, 10)
    assert meter.admit("c", {"calls": 1}).status == 402
    clock.advance(10)
    decision = meter.admit("c", {"calls": 1})
    assert (decision.status, decision.balances) == (200, {"credits": 99})
    expired = [d for t, d in events(meter) if t == "reservation.expired"]
    assert expired == [
        {"customer": "c", "balance": "credits", "reservation": rid, "amount": 100, "seq": 3}
    ]


def test_release_after_expiry_is_a_conflict_and_expiry_emits_once(
    make_meter: MakeMeter, clock: Any
) -> None:
    """An expired hold is released once: one event, one ledger entry, then Conflicts."""
    meter = make_meter(config())
    rid = meter.reserve("c", "credits", 30, TTL_S)
    clock.advance(TTL_S + 1)
    closes: list[Callable[[], object]] = [lambda: meter.release(rid), lambda: meter.commit(rid, 5)]
    for close in closes:
        with pytest.raises(Conflict) as info:
            close()
        assert (info.value.slug, info.value.status) == ("reservation-closed", 409)
    for _ in range(3):
        assert amounts(meter) == (100, 0, 100)
    assert [d for t, d in events(meter) if t == "reservation.expired"] == [
        {"customer": "c", "balance": "credits", "reservation": rid, "amount": 30, "seq": 1}
    ]
    assert kinds(meter) == ["expire", "hold", "initial"]
    assert meter.ledger("c")[0]["op"] == rid


def test_racing_sweepers_expire_a_hold_once(make_meter: MakeMeter, clock: Any) -> None:
    """Many meters reading an expired hold at once release it exactly once."""
    meters = [make_meter(config()) for _ in range(4)]
    rids = [meters[0].reserve("c", "credits", 10, 5) for _ in range(3)]
    clock.advance(5)
    with ThreadPoolExecutor(8) as pool:
        states = list(pool.map(lambda i: meters[i % 4].balance("c", "credits"), range(32)))
    assert {(s.amount, s.held) for s in states} == {(100, 0)}
    expired = sorted(d["reservation"] for t, d in events(meters[0]) if t == "reservation.expired")
    assert expired == sorted(rids)
    assert kinds(meters[0]).count("expire") == 3


# -- concurrency -----------------------------------------------------------------------------


def _reserve_many(meter: Meter, count: int, threads: int) -> int:
    """Try `count` reservations of 1 credit on `threads` threads; return how many succeeded."""

    def one(_: int) -> bool:
        try:
            meter.reserve("c", "credits", 1, 300)
        except Conflict as exc:
            assert (exc.status, exc.slug) == (402, "insufficient-credits")
            return False
        return True

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, range(count)))


def test_concurrent_reservations_in_threads_never_overshoot(make_meter: MakeMeter) -> None:
    """1,000 concurrent reservations of 1 credit on a balance of 10 succeed exactly 10 times."""
    meter = make_meter(config(amount=10, overage=0, low_at=None))
    assert _reserve_many(meter, 1000, 16) == 10
    assert amounts(meter) == (10, 10, 0)
    assert kinds(meter).count("hold") == 10


def storage(url: str) -> dict[str, Any]:
    """Storage settings with a timeout generous enough for a loaded test machine."""
    return {"url": url, "timeout_ms": 5000}


def _process_worker(url: str, start: Any, results: Any) -> None:
    """In a spawned process: wait for the start, race 500 holds on 8 threads, report the count."""
    meter = Meter({**config(amount=10, overage=0, low_at=None), "storage": storage(url)})
    try:
        meter.balance("c", "credits")  # connect and load the scripts before the race
        start.wait(60)
        results.put(_reserve_many(meter, 500, 8))
    except BaseException as exc:
        # fail the test at once rather than at the barrier's or the queue's timeout
        start.abort()
        results.put(repr(exc))
        raise
    finally:
        meter.close()


@pytest.mark.redis
def test_concurrent_reservations_from_two_processes_never_overshoot(redis_server: Any) -> None:
    """1,000 holds of 1 credit from two processes on a balance of 10 succeed exactly 10 times."""
    client = redis_server.client()
    client.flushall()
    client.close()
    cfg = {**config(amount=10, overage=0, low_at=None), "storage": storage(redis_server.url)}
    meter = Meter(cfg)
    try:
        assert amounts(meter) == (10, 0, 10)
        ctx = multiprocessing.get_context("spawn")
        start, results = ctx.Barrier(3), ctx.Queue()
        workers = [
            ctx.Process(target=_process_worker, args=(redis_server.url, start, results))
            for _ in range(2)
        ]
        for worker in workers:
            worker.start()
        start.wait(60)
        successes = [results.get(timeout=120) for _ in workers]
        assert all(isinstance(n, int) for n in successes), successes
        for worker in workers:
            worker.join(10)
            assert worker.exitcode == 0
        assert sum(successes) == 10
        assert amounts(meter) == (10, 10, 0)
        assert kinds(meter).count("hold") == 10
    finally:
        meter.close()
