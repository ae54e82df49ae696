"""Operation ids: a replay returns the first result and changes nothing; other parameters: 409."""

from __future__ import annotations

from typing import Any

from tests.builders import asset, customer, gateway, metric, plan, tier

from metergate import Meter


def config() -> dict[str, Any]:
    """Priced `calls` (Deny past 10), a TotalCounter `storage`, an UpDownCounter `flight`."""
    calls = asset(
        tier(0, per_unit=3), tier(10, "OverUsage", "Deny"), period="month", balance="credits"
    )
    return gateway(
        metrics={
            "calls": metric(),
            "storage": metric("TotalCounter"),
            "flight": metric("UpDownCounter"),
        },
        plans={
            "p": plan(calls=calls, storage=asset(tier(0), period="month"), flight=asset(tier(0)))
        },
        customers={"c": customer("p", credits=100), "d": customer("p", credits=100)},
    )


def outbox_length(meter: Meter, customer: str = "c") -> int:
    """How many events the customer's partition outbox holds."""
    return int(
        meter.storage.client.xlen(meter.core.keys.outbox(meter.core.keys.partition(customer)))
    )


def test_replay_returns_the_first_result_and_changes_nothing(make_meter: Any) -> None:
    """Replaying a key returns the first Decision, later admissions or not, recording nothing."""
    meter = make_meter(config())
    first = meter.admit("c", {"calls": 2}, idempotency_key="req-1")
    assert (first.status, first.assets["calls"].value, first.balances) == (200, 2, {"credits": 94})
    assert meter.admit("c", {"calls": 1}).assets["calls"].value == 3
    replay = meter.admit("c", {"calls": 2}, idempotency_key="req-1")
    assert replay == first
    assert meter.usage("c", "calls")["value"] == 3
    assert meter.balance("c", "credits").amount == 91
    # two charges (the replay added none), in one usage line of this window
    ledger = [(e["kind"], e["delta"], e.get("count")) for e in meter.ledger("c")]
    assert ledger == [("usage", -9, 2), ("initial", 100, None)]


def test_replay_from_another_gateway_changes_nothing(make_meter: Any) -> None:
    """Operation ids are deduplicated in storage: a second gateway replaying one records nothing."""
    first_gateway, second_gateway = make_meter(config()), make_meter(config())
    first = first_gateway.admit("c", {"calls": 4}, idempotency_key="req-1")
    assert second_gateway.admit("c", {"calls": 4}, idempotency_key="req-1") == first
    assert second_gateway.usage("c", "calls")["value"] == 4


def test_same_key_with_other_amounts_is_a_409_conflict(make_meter: Any) -> None:
    """Reusing a key with different amounts or metrics is refused with 409 and changes nothing."""
    meter = make_meter(config())
    assert meter.admit("c", {"calls": 2}, idempotency_key="req-1").allowed
    events_before = outbox_length(meter)
    for amounts in ({"calls": 3}, {"calls": 2, "storage": 1}, {"storage": 2}):
        conflict = meter.admit("c", amounts, idempotency_key="req-1")
        assert (conflict.allowed, conflict.status, conflict.problem) == (
            False,
            409,
            "idempotency-conflict",
        )
        assert conflict.detail == "this idempotency key was used with different parameters"
    assert meter.record("c", "calls", 2, idempotency_key="req-1").status == 409
    assert meter.usage("c", "calls")["value"] == 2
    assert meter.usage("c", "storage")["value"] == 0
    assert meter.balance("c", "credits").amount == 94
    assert outbox_length(meter) == events_before


def test_keys_are_scoped_to_the_customer(make_meter: Any) -> None:
    """Two customers using the same idempotency key are two operations."""
    meter = make_meter(config())
    assert meter.admit("c", {"calls": 1}, idempotency_key="same").assets["calls"].value == 1
    other = meter.admit("d", {"calls": 5}, idempotency_key="same")
    assert (other.status, other.assets["calls"].value) == (200, 5)
    assert meter.balance("d", "credits").amount == 85


def test_a_refused_admission_is_decided_anew_on_retry(make_meter: Any, clock: Any) -> None:
    """A refusal is not remembered: the same key retried once the limit frees is admitted, once."""
    meter = make_meter(config())
    assert meter.admit("c", {"calls": 9}).allowed
    refused = meter.admit("c", {"calls": 2}, idempotency_key="req-1")
    assert (refused.status, refused.problem) == (429, "quota-exceeded")
    clock.now = 1_801_440_000
    admitted = meter.admit("c", {"calls": 2}, idempotency_key="req-1")
    assert (admitted.status, admitted.assets["calls"].value) == (200, 2)
    assert meter.admit("c", {"calls": 2}, idempotency_key="req-1") == admitted
    assert meter.usage("c", "calls")["value"] == 2


def test_replayed_total_counter_report_is_counted_once(make_meter: Any) -> None:
    """A TotalCounter report replayed with its key adds its delta once."""
    meter = make_meter(config())
    meter.record("c", "storage", 10, idempotency_key="r-1")
    first = meter.record("c", "storage", 4, idempotency_key="r-2")
    assert first.assets["storage"].value == 14
    assert meter.record("c", "storage", 4, idempotency_key="r-2") == first
    assert meter.record("c", "storage", 10, idempotency_key="r-1").assets["storage"].value == 10
    assert meter.usage("c", "storage")["value"] == 14


def test_replayed_signed_delta_is_applied_once(make_meter: Any) -> None:
    """An UpDownCounter delta replayed with its key moves the value once."""
    meter = make_meter(config())
    meter.record("c", "flight", 5, idempotency_key="up")
    meter.record("c", "flight", 5, idempotency_key="up")
    meter.record("c", "flight", -2, idempotency_key="down")
    meter.record("c", "flight", -2, idempotency_key="down")
    assert meter.usage("c", "flight")["value"] == 3
    assert meter.record("c", "flight", -3, idempotency_key="down").status == 409


def test_replayed_estimate_keeps_one_hold_and_settles_once(make_meter: Any) -> None:
    """A replayed estimate returns the same ticket; settling it twice keeps the first settlement."""
    meter = make_meter(config())
    first = meter.admit("c", {}, idempotency_key="req-1", estimates={"calls": 5})
    replay = meter.admit("c", {}, idempotency_key="req-1", estimates={"calls": 5})
    assert replay == first and first.ticket is not None
    usage = meter.usage("c", "calls")
    assert (usage["value"], usage["pending"]) == (0, 5)
    assert meter.balance("c", "credits").held == 15
    settled = meter.settle(first.ticket, {"calls": 4})
    assert (settled.assets["calls"].value, settled.balances) == (4, {"credits": 88})
    assert meter.settle(first.ticket, {"calls": 4}) == settled
    assert meter.settle(first.ticket, {"calls": 7}) == settled
    state = meter.balance("c", "credits")
    assert (state.amount, state.held) == (88, 0)
    assert meter.usage("c", "calls")["value"] == 4


def test_replayed_lease_is_taken_and_ended_once(make_meter: Any) -> None:
    """A replayed UpDownCounter admission holds one lease, and ending it twice subtracts once."""
    meter = make_meter(config())
    meter.record("c", "flight", 1)
    first = meter.admit("c", {"flight": 2}, idempotency_key="req-1")
    assert meter.admit("c", {"flight": 2}, idempotency_key="req-1") == first
    assert first.ticket is not None
    assert meter.usage("c", "flight")["value"] == 3
    meter.settle(first.ticket)
    meter.settle(first.ticket)
    assert meter.usage("c", "flight")["value"] == 1


def test_admissions_without_a_key_are_never_merged(make_meter: Any) -> None:
    """Two identical admissions without an idempotency key are two operations."""
    meter = make_meter(config())
    meter.admit("c", {"calls": 1})
    assert meter.admit("c", {"calls": 1}).assets["calls"].value == 2
