"""Idempotency keys of balance mutations on every backend: every parameter counts, atomically."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from tests.storage.credits import config

from metergate import Conflict, Meter

MakeMeter = Callable[..., Meter]


def test_commit_key_reused_on_another_reservation_is_a_conflict(make_meter: MakeMeter) -> None:
    """A commit key replayed on another reservation is a 409, never a silent success."""
    meter = make_meter(config())
    r1 = meter.reserve("c", "credits", 10, 60)
    r2 = meter.reserve("c", "credits", 10, 60)
    meter.commit(r1, 10, idempotency_key="close-1")
    with pytest.raises(Conflict) as info:
        meter.commit(r2, 10, idempotency_key="close-1")
    assert info.value.slug == "idempotency-conflict"
    assert meter.balance("c", "credits").held == 10
    meter.commit(r1, 10, idempotency_key="close-1")  # the true retry replays
    assert meter.balance("c", "credits").amount == 90


def test_concurrent_reserves_with_one_key_make_one_reservation(make_meter: MakeMeter) -> None:
    """Twenty concurrent reserves with the same key give one reservation id and one hold."""
    meter = make_meter(config())
    with ThreadPoolExecutor(8) as pool:
        rids = list(
            pool.map(
                lambda _: meter.reserve("c", "credits", 7, 60, idempotency_key="r-1"), range(20)
            )
        )
    assert len(set(rids)) == 1
    assert meter.balance("c", "credits").held == 7
    holds = [e for e in meter.ledger("c", 10_000) if e["kind"] == "hold"]
    assert len(holds) == 1


def test_reserve_key_with_other_parameters_is_a_conflict(make_meter: MakeMeter) -> None:
    """The same reserve key with another amount or ttl is a 409 and holds nothing more."""
    meter = make_meter(config())
    meter.reserve("c", "credits", 7, 60, idempotency_key="r-2")
    for amount, ttl in ((8, 60), (7, 61)):
        with pytest.raises(Conflict):
            meter.reserve("c", "credits", amount, ttl, idempotency_key="r-2")
    assert meter.balance("c", "credits").held == 7


def test_topup_and_withdraw_keys_cover_the_operation(make_meter: MakeMeter) -> None:
    """A top-up key replayed as a withdrawal, or with another amount, is a 409."""
    meter = make_meter(config())
    meter.topup("c", "credits", 5, idempotency_key="t-1")
    meter.topup("c", "credits", 5, idempotency_key="t-1")
    for call in (
        lambda: meter.withdraw("c", "credits", 5, idempotency_key="t-1"),
        lambda: meter.topup("c", "credits", 6, idempotency_key="t-1"),
    ):
        with pytest.raises(Conflict):
            call()
    assert meter.balance("c", "credits").amount == 105


def test_cancel_releases_a_reservation_or_voids_a_late_one(make_meter: MakeMeter) -> None:
    """Cancelling a reservation whose reply was lost releases its hold; cancelling before it
    arrives makes the late reservation a conflict that holds nothing; twice is harmless."""
    meter = make_meter(config())
    meter.reserve("c", "credits", 7, 60, idempotency_key="lost-1")
    assert meter.cancel_reservation("c", "credits", "lost-1") == "released"
    assert meter.cancel_reservation("c", "credits", "lost-1") == "closed"
    assert meter.balance("c", "credits").held == 0
    assert meter.cancel_reservation("c", "credits", "lost-2") == "voided"
    with pytest.raises(Conflict):
        meter.reserve("c", "credits", 7, 60, idempotency_key="lost-2")
    assert meter.balance("c", "credits").held == 0
    assert meter.balance("c", "credits").amount == 100
