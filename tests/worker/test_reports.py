"""`usage.reported` windows and `period.closed` events, on the embedded backend and a real Redis.

Until the admission script aggregates usage itself, these tests write the aggregation structure
with the same commands it will run (see `record_usage` and `open_period`).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from conftest import Clock
from metergate.core.flows import Script
from metergate.core.keys import Keys
from metergate.storage import AsyncStorage
from metergate.worker import Worker
from metergate.worker.keys import WorkerKeys
from metergate.worker.reports import UsageReporter, window_of

from .conftest import SECRET, Recorder, Server, gateway, run

KEYS = WorkerKeys(Keys("mg", 4))
US = "\x1f"
MINUTE_MS = 60_000
METRICS = {
    "calls": {"type": "CumulativeCounter"},
    "tokens": {"type": "CumulativeCounter"},
    "seats": {"type": "Gauge"},
}


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def record_usage(
    storage: AsyncStorage,
    customer: str,
    metric: str,
    at_ms: int,
    quantity: int,
    overage: int = 0,
    credits: int = 0,
    period_start_ms: int = 0,
) -> None:
    """What admit.lua does per counted asset: aggregate into the window of `at_ms`."""
    p = KEYS.keys.partition(customer)
    start, end = window_of(at_ms, MINUTE_MS)
    window, pair = KEYS.usage_window(p, start), f"{customer}{US}{metric}"
    client = storage.client
    await client.hincrby(window, f"q{US}{pair}", quantity)
    if overage:
        await client.hincrby(window, f"o{US}{pair}", overage)
    if credits:
        await client.hincrby(window, f"c{US}{pair}", credits)
    await client.hset(window, f"p{US}{pair}", str(period_start_ms))
    await client.zadd(KEYS.usage_open(p), {str(start): end})


async def open_period(
    storage: AsyncStorage, customer: str, metric: str, ps_ms: int, pe_ms: int, **state: int
) -> str:
    """What admit.lua does when an asset enters a period: bounds in the hash, a closing entry."""
    akey, _ = KEYS.keys.asset(customer, metric)
    fields = {"ps": ps_ms, "pe": pe_ms, **state}
    await storage.client.hset(akey, mapping={k: str(v) for k, v in fields.items()})
    await storage.client.zadd(
        KEYS.closing(KEYS.keys.partition(customer)), {f"{customer}{US}{metric}": pe_ms}
    )
    return akey


async def outbox_events(storage: AsyncStorage, etype: str) -> list[dict[str, Any]]:
    """Every event of a type in the outboxes, data parsed."""
    out = []
    for p in range(4):
        for _, fields in await storage.client.xrange(KEYS.outbox(p)):
            if fields["type"] == etype:
                out.append({**fields, "data": json.loads(fields["data"])})
    return out


def test_usage_reported_once_per_pair_with_deterministic_ids(
    storage_url: str, clock: Clock, receiver: tuple[Recorder, Server]
) -> None:
    """A window is cut after it ends plus grace: one event per pair, id usage:c:m:start, once."""
    recorder, server = receiver
    hook = {"url": server.url + "/hook", "secret": SECRET, "events": ["usage.reported"]}
    config = gateway(storage_url, [hook], metrics=METRICS)
    now_ms = int(clock() * 1000)
    start, end = window_of(now_ms, MINUTE_MS)
    period = now_ms - 3 * 86_400_000

    async def scenario(storage: AsyncStorage) -> None:
        await record_usage(storage, "acme", "calls", now_ms, 3, period_start_ms=period)
        await record_usage(storage, "acme", "calls", now_ms + 1000, 4, period_start_ms=period)
        await record_usage(storage, "acme", "tokens", now_ms, 100, 10, 5, period_start_ms=period)
        await record_usage(storage, "bob", "calls", now_ms, 1, period_start_ms=period)
        async with httpx.AsyncClient() as http:
            worker = Worker(config, storage, clock, http)
            clock.now = end / 1000 + 1  # ended, but within the grace
            assert (await worker.run_once()).reported == 0
            clock.advance(10)
            first = await worker.run_once()
            again = await worker.run_once()
        assert (first.reported, again.reported) == (3, 0)
        events = {e["id"]: e for e in await outbox_events(storage, "usage.reported")}
        s = start // 1000
        assert set(events) == {
            f"usage:acme:calls:{s}",
            f"usage:acme:tokens:{s}",
            f"usage:bob:calls:{s}",
        }
        tokens = events[f"usage:acme:tokens:{s}"]["data"]
        assert tokens == {
            "customer": "acme",
            "metric": "tokens",
            "window_start": iso(start),
            "window_end": iso(end),
            "quantity": 100,
            "overage_quantity": 10,
            "credits_charged": 5,
            "period_start": iso(period),
            "seq": tokens["seq"],
        }
        assert events[f"usage:acme:calls:{s}"]["data"]["quantity"] == 7
        assert sorted(recorder.ids()) == sorted(events)
        assert (
            await storage.client.exists(KEYS.usage_window(KEYS.keys.partition("acme"), start)) == 0
        )

    run(scenario, storage_url)


def test_late_usage_is_carried_forward_never_reported_twice(storage_url: str, clock: Clock) -> None:
    """Usage arriving for a reported window (or pair) goes to the open window, under its id."""
    config = gateway(storage_url, [], metrics=METRICS)
    now_ms = int(clock() * 1000)
    _, end = window_of(now_ms, MINUTE_MS)

    async def scenario(storage: AsyncStorage) -> None:
        async with httpx.AsyncClient() as http:
            worker = Worker(config, storage, clock, http)
            await record_usage(storage, "acme", "calls", now_ms, 5)
            clock.now = end / 1000 + 30
            assert (await worker.run_once()).reported == 1
            await record_usage(storage, "acme", "calls", now_ms, 2)  # a lagging gateway
            assert (await worker.run_once()).reported == 0
            clock.advance(120)
            assert (await worker.run_once()).reported == 1
        events = await outbox_events(storage, "usage.reported")
        ids = [e["id"] for e in events]
        assert len(ids) == len(set(ids)) == 2
        assert [e["data"]["quantity"] for e in events] == [5, 2]
        carry_start, _ = window_of(end + 30_000, MINUTE_MS)
        assert ids[1] == f"usage:acme:calls:{carry_start // 1000}"

    run(scenario, storage_url)


def test_a_partly_reported_window_carries_late_usage_of_reported_pairs(
    storage_url: str, clock: Clock
) -> None:
    """Late usage for a pair already reported in a window still open moves on; others report."""
    now_ms = int(clock() * 1000)
    start, end = window_of(now_ms, MINUTE_MS)
    p = KEYS.keys.partition("acme")

    async def scenario(storage: AsyncStorage) -> None:
        reporter = UsageReporter(storage, KEYS, MINUTE_MS)
        await record_usage(storage, "acme", "calls", now_ms, 5)
        await record_usage(storage, "acme", "tokens", now_ms, 9)
        later = end + 60_000
        carry, carry_end = window_of(later, MINUTE_MS)
        reply = await reporter._call(p, start, end, carry, carry_end, later, [("acme", "calls")])
        assert reply == ["reported", "1"]
        await record_usage(storage, "acme", "calls", now_ms, 2)  # late, for the reported pair
        assert await reporter.report_window(p, start, end, later) == 1  # tokens only
        assert await storage.client.hget(KEYS.usage_window(p, carry), f"q{US}acme{US}calls") == "2"
        events = await outbox_events(storage, "usage.reported")
        assert sorted((e["data"]["metric"], e["data"]["quantity"]) for e in events) == [
            ("calls", 5),
            ("tokens", 9),
        ]
        assert await storage.client.zscore(KEYS.usage_done(p), str(start)) == start

    run(scenario, storage_url)


def test_concurrent_chunked_reporting_emits_each_pair_once(storage_url: str, clock: Clock) -> None:
    """Two reporters cutting the same window in chunks of two emit each of nine pairs once."""
    now_ms = int(clock() * 1000)
    _, end = window_of(now_ms, MINUTE_MS)
    customers = [c for c in (f"c{i}" for i in range(60)) if KEYS.keys.partition(c) == 0][:3]

    async def scenario(storage: AsyncStorage) -> None:
        for customer in customers:
            for metric in ("calls", "tokens", "seats"):
                await record_usage(storage, customer, metric, now_ms, 1)
        one = UsageReporter(storage, KEYS, MINUTE_MS, chunk=2)
        two = UsageReporter(storage, KEYS, MINUTE_MS, chunk=2)
        later = end + 10_000
        counts = await asyncio.gather(one.run(0, later), two.run(0, later))
        assert sum(counts) == 9
        ids = [e["id"] for e in await outbox_events(storage, "usage.reported")]
        assert len(ids) == len(set(ids)) == 9
        assert await one.run(0, later + 60_000) == 0

    run(scenario, storage_url)


@pytest.mark.parametrize(
    "moment",
    [
        "1970-01-01T00:00:00Z",
        "2000-02-29T12:34:56Z",
        "2100-03-01T00:00:59Z",
        "2024-12-31T23:59:00Z",
    ],
)
def test_script_dates_match_python(storage_url: str, moment: str) -> None:
    """The scripts' RFC 3339 dates agree with Python's across leap days and centuries."""
    at_ms = int(datetime.fromisoformat(moment.replace("Z", "+00:00")).timestamp() * 1000)
    start, end = window_of(at_ms, MINUTE_MS)

    async def scenario(storage: AsyncStorage) -> None:
        await record_usage(storage, "acme", "calls", at_ms, 1, period_start_ms=at_ms)
        reporter = UsageReporter(storage, KEYS, MINUTE_MS)
        await reporter.report_window(KEYS.keys.partition("acme"), start, end, end + 120_000)
        (event,) = await outbox_events(storage, "usage.reported")
        data = event["data"]
        assert (data["window_start"], data["window_end"]) == (iso(start), iso(end))
        assert data["period_start"] == moment

    run(scenario, storage_url)


def test_period_closed_for_an_idle_customer(storage_url: str, clock: Clock) -> None:
    """An asset with no traffic after its period's end is closed once, after the grace."""
    config = gateway(storage_url, [], metrics=METRICS)
    ps = int(datetime(2027, 1, 1, tzinfo=UTC).timestamp() * 1000)
    pe = int(datetime(2027, 2, 1, tzinfo=UTC).timestamp() * 1000)

    async def scenario(storage: AsyncStorage) -> None:
        akey = await open_period(storage, "acme", "calls", ps, pe, v=42, ovg=2, crd=9)
        await open_period(storage, "acme", "seats", ps, pe, v=3, peak=7)
        async with httpx.AsyncClient() as http:
            worker = Worker(config, storage, clock, http)
            clock.now = pe / 1000 + 10  # ended, within the grace
            assert (await worker.run_once()).closed == 0
            clock.advance(60)
            assert (await worker.run_once()).closed == 2
            assert (await worker.run_once()).closed == 0
        events = {e["data"]["metric"]: e for e in await outbox_events(storage, "period.closed")}
        calls = events["calls"]
        assert calls["id"] == f"period:acme:calls:{ps // 1000}"
        assert calls["data"] == {
            "customer": "acme",
            "metric": "calls",
            "period_start": "2027-01-01T00:00:00Z",
            "period_end": "2027-02-01T00:00:00Z",
            "value": 42,
            "overage": 2,
            "credits_charged": 9,
            "seq": calls["data"]["seq"],
        }
        assert events["seats"]["data"]["peak"] == 7
        assert await storage.client.hget(akey, "cps") == str(ps)
        assert await storage.client.zcard(KEYS.closing(KEYS.keys.partition("acme"))) == 0

    run(scenario, storage_url)


def test_no_idle_close_for_a_period_the_admission_closed(storage_url: str, clock: Clock) -> None:
    """A period an admission closed (cps) or rolled over meanwhile is not closed by the worker."""
    config = gateway(storage_url, [], metrics=METRICS)
    ps, pe = 1_000_000, 2_000_000

    async def scenario(storage: AsyncStorage) -> None:
        await open_period(storage, "acme", "calls", ps, pe, v=1, cps=ps)
        bob = await open_period(storage, "bob", "calls", ps, pe, v=1)
        p = KEYS.keys.partition("bob")
        now = str(int(clock() * 1000))
        closing, outbox = KEYS.closing(p), KEYS.outbox(p)
        script_keys = (closing, outbox, KEYS.keys.customer("bob"), bob)
        # An admission rolled bob over between the worker's read and its script call.
        await storage.client.hset(bob, mapping={"ps": str(pe), "pe": str(2 * pe)})
        reply = await storage.run(
            Script("close", script_keys, (now, "bob", "calls", str(ps), "C", "0"))
        )
        assert reply == ["moved"]
        async with httpx.AsyncClient() as http:
            worker = Worker(config, storage, clock, http)
            assert (await worker.run_once()).closed == 1  # bob's second period has ended too
        (event,) = await outbox_events(storage, "period.closed")
        assert event["id"] == f"period:bob:calls:{pe // 1000}"

    run(scenario, storage_url)


def test_usage_event_ids_of_names_with_colons_never_collide(
    storage_url: str, clock: Clock, receiver: tuple[Recorder, Server]
) -> None:
    """Customer `acme:x` on `calls` and customer `acme` on `x:calls` get two different event ids."""
    recorder, server = receiver
    hook = {"url": server.url + "/hook", "secret": SECRET, "events": ["usage.reported"]}
    metrics = {**METRICS, "x:calls": {"type": "CumulativeCounter"}}
    config = gateway(storage_url, [hook], metrics=metrics)
    now_ms = int(clock() * 1000)
    _, end = window_of(now_ms, MINUTE_MS)

    async def scenario(storage: AsyncStorage) -> None:
        await record_usage(storage, "acme:x", "calls", now_ms, 3)
        await record_usage(storage, "acme", "x:calls", now_ms, 4)
        async with httpx.AsyncClient() as http:
            worker = Worker(config, storage, clock, http)
            clock.now = end / 1000 + 30
            assert (await worker.run_once()).reported == 2
        events = await outbox_events(storage, "usage.reported")
        ids = {e["id"] for e in events}
        assert len(ids) == 2, ids
        # a receiver deduplicating by id keeps both
        assert len(set(recorder.ids())) == 2

    run(scenario, storage_url)


def test_period_closed_ids_of_names_with_colons_never_collide(
    storage_url: str, clock: Clock
) -> None:
    """Customer `acme:x` on `calls` and customer `acme` on `x:calls` close under two event ids."""
    metrics = {**METRICS, "x:calls": {"type": "CumulativeCounter"}}
    config = gateway(storage_url, [], metrics=metrics)
    ps = int(datetime(2027, 1, 1, tzinfo=UTC).timestamp() * 1000)
    pe = int(datetime(2027, 2, 1, tzinfo=UTC).timestamp() * 1000)

    async def scenario(storage: AsyncStorage) -> None:
        await open_period(storage, "acme:x", "calls", ps, pe, v=1)
        await open_period(storage, "acme", "x:calls", ps, pe, v=2)
        async with httpx.AsyncClient() as http:
            worker = Worker(config, storage, clock, http)
            clock.now = pe / 1000 + 120
            assert (await worker.run_once()).closed == 2
        ids = {e["id"] for e in await outbox_events(storage, "period.closed")}
        assert ids == {f"period:acme%3Ax:calls:{ps // 1000}", f"period:acme:x%3Acalls:{ps // 1000}"}

    run(scenario, storage_url)
