"""Outbox delivery to webhook receivers, on the embedded backend and a real Redis."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx
from tests.builders import asset, counters, customer, plan, tier

from conftest import Clock
from metergate.core.keys import Keys
from metergate.meter import AsyncMeter
from metergate.storage import AsyncStorage
from metergate.worker import Worker, WorkerSettings, alive_workers, run_worker, verify
from metergate.worker.destinations import WebhookEndpoint
from metergate.worker.keys import GROUP, WorkerKeys
from metergate.worker.outbox import Outbox

from .conftest import SECRET, Recorder, Server, gateway, run, serving

HOOK = {"secret": SECRET, "events": ["quota.*", "balance.*", "asset.*"]}


async def emit(
    storage: AsyncStorage, customer: str, etype: str, data: dict[str, Any], time_ms: int
) -> str:
    """Append an event the way the scripts' `emit` does (4 partitions, prefix mg)."""
    keys = Keys("mg", 4)
    client = storage.client
    seq = await client.hincrby(keys.customer(customer), "seq", 1)
    event_id = f"evt_{customer}_{seq}"
    body = json.dumps({"customer": customer, **data, "seq": seq})
    await client.xadd(
        keys.outbox(keys.partition(customer)),
        {"id": event_id, "type": etype, "customer": customer, "time": str(time_ms), "data": body},
    )
    return event_id


async def pending(storage: AsyncStorage) -> int:
    """Entries read by the group and not acknowledged, over all partitions."""
    total = 0
    for p in range(4):
        summary = await storage.client.xpending(Keys("mg", 4).outbox(p), GROUP)
        total += int(summary["pending"])
    return total


async def dead_letters(storage: AsyncStorage) -> list[dict[str, str]]:
    """Every dead letter, over all partitions."""
    keys = WorkerKeys(Keys("mg", 4))
    out = []
    for p in range(4):
        for _, fields in await storage.client.xrange(keys.dead_letters(p)):
            out.append(fields)
    return out


def test_each_event_is_delivered_once_signed(
    storage_url: str, clock: Clock, receiver: tuple[Recorder, Server]
) -> None:
    """Matching events reach the receiver once each, signed, with webhook-id = the event id."""
    recorder, server = receiver
    config = gateway(storage_url, [{"url": server.url + "/hook", **HOOK}])

    async def scenario(storage: AsyncStorage) -> None:
        now_ms = int(clock() * 1000)
        wanted = [
            await emit(storage, "acme", "balance.low", {"balance": "c", "amount": 5}, now_ms),
            await emit(storage, "bob", "quota.level_changed", {"metric": "calls"}, now_ms),
        ]
        await emit(storage, "acme", "reservation.expired", {"balance": "c"}, now_ms)
        async with httpx.AsyncClient() as http:
            worker = Worker(config, storage, clock, http)
            first = await worker.run_once()
            second = await worker.run_once()
        assert (first.read, first.delivered, first.acknowledged) == (3, 2, 3)
        assert (second.read, second.delivered) == (0, 0)
        assert sorted(recorder.ids()) == sorted(wanted)
        for request in recorder.requests:
            body = verify(request.body, request.headers, SECRET, now=clock())
            assert body["timestamp"] == "2027-01-15T08:00:00.000Z"
            assert body["data"]["customer"] in ("acme", "bob")
            assert request.headers["content-type"] == "application/json"
        assert await pending(storage) == 0

    run(scenario, storage_url)


def test_events_of_real_admissions_are_delivered(
    make_meter: Any, storage_url: str, clock: Clock, receiver: tuple[Recorder, Server]
) -> None:
    """Events the scripts emit (a top-up, a level change) arrive with their SPEC data."""
    recorder, server = receiver
    spec = {
        "metrics": counters("calls"),
        "plans": {"p": plan(calls=asset(tier(0), tier(2, "Warning"), period="month"))},
        "customers": {"acme": customer("p", credits={})},
        "webhooks": [{"url": server.url + "/hook", **HOOK}],
        "storage": {"partitions": 4},
    }
    meter = make_meter(spec)
    meter.topup("acme", "credits", 50)
    assert meter.admit("acme", {"calls": 3}).allowed
    config = meter.config

    async def scenario(storage: AsyncStorage) -> None:
        async with httpx.AsyncClient() as http:
            await Worker(config, storage, clock, http).run_once()

    run(scenario, storage_url)
    bodies = {r.json()["type"]: r.json()["data"] for r in recorder.requests}
    assert bodies["balance.topped_up"]["amount"] == 50
    assert bodies["balance.topped_up"]["customer"] == "acme"
    level = bodies["quota.level_changed"]
    assert (level["from_level"], level["to_level"], level["value"]) == ("Normal", "Warning", 3)
    seqs = sorted(data["seq"] for data in bodies.values())
    assert seqs == sorted(set(seqs))


def test_receiver_down_then_up_gets_the_retry(storage_url: str, clock: Clock) -> None:
    """A refused connection is retried about 5 s later and delivered once the receiver is up."""
    recorder = Recorder()
    down = Server(recorder.app())  # a reserved port with nobody listening yet
    config = gateway(storage_url, [{"url": down.url + "/hook", **HOOK}])

    async def scenario(storage: AsyncStorage) -> None:
        event_id = await emit(storage, "acme", "balance.low", {}, int(clock() * 1000))
        async with httpx.AsyncClient() as http:
            worker = Worker(config, storage, clock, http, rng=random.Random(1))
            assert (await worker.run_once()).retrying == 1
            clock.advance(4)  # before the earliest jittered retry (4.5 s)
            assert (await worker.run_once()).delivered == 0
            down.start()
            try:
                clock.advance(2)
                report = await worker.run_once()
                assert (report.delivered, report.acknowledged) == (1, 1)
                clock.advance(3600)
                assert (await worker.run_once()).delivered == 0
            finally:
                down.stop()
        assert recorder.ids() == [event_id]
        assert await pending(storage) == 0

    run(scenario, storage_url)


def test_gone_disables_the_endpoint_and_spares_the_others(storage_url: str, clock: Clock) -> None:
    """A 410 disables that endpoint (persisted in Redis); the other one still gets everything."""
    gone, fine = Recorder(default=(410, {}, b"")), Recorder()
    with serving(gone.app()) as g, serving(fine.app()) as f:
        config = gateway(
            storage_url, [{"url": g.url + "/a", **HOOK}, {"url": f.url + "/b", **HOOK}]
        )
        gone_id = WebhookEndpoint(g.url + "/a", SECRET).id

        async def scenario(storage: AsyncStorage) -> None:
            now_ms = int(clock() * 1000)
            async with httpx.AsyncClient() as http:
                first = Worker(config, storage, clock, http)
                e1 = await emit(storage, "acme", "balance.low", {}, now_ms)
                await first.run_once()
                e2 = await emit(storage, "acme", "balance.low", {}, now_ms)
                await first.run_once()
                assert gone_id in await storage.client.hgetall(first.keys.disabled)
                restarted = Worker(config, storage, clock, http)
                e3 = await emit(storage, "bob", "balance.low", {}, now_ms)
                await restarted.run_once()
                assert await restarted.enable(gone_id)
                e4 = await emit(storage, "bob", "balance.low", {}, now_ms)
                await restarted.run_once()
            assert gone.ids() == [e1, e4]
            assert fine.ids() == [e1, e2, e3, e4]
            letters = await dead_letters(storage)
            assert sorted(d["id"] for d in letters) == sorted([e1, e2, e3, e4])
            assert all(d["destination"] == gone_id for d in letters)
            assert await pending(storage) == 0

        run(scenario, storage_url)


def test_retry_after_is_honoured(
    storage_url: str, clock: Clock, receiver: tuple[Recorder, Server]
) -> None:
    """A 429 with Retry-After: 120 is retried after 120 s, not on the 5 s schedule."""
    recorder, server = receiver
    recorder.answer(429, {"retry-after": "120"})
    config = gateway(storage_url, [{"url": server.url + "/hook", **HOOK}])

    async def scenario(storage: AsyncStorage) -> None:
        event_id = await emit(storage, "acme", "balance.low", {}, int(clock() * 1000))
        async with httpx.AsyncClient() as http:
            worker = Worker(config, storage, clock, http)
            await worker.run_once()
            clock.advance(60)
            await worker.run_once()
            assert len(recorder.requests) == 1
            clock.advance(61)
            assert (await worker.run_once()).delivered == 1
        assert recorder.ids() == [event_id, event_id]
        stamps = [int(r.headers["webhook-timestamp"]) for r in recorder.requests]
        assert stamps[1] - stamps[0] == 121

    run(scenario, storage_url)


def test_a_failing_endpoint_neither_blocks_nor_duplicates_others(
    storage_url: str, clock: Clock
) -> None:
    """While one endpoint fails, the other gets each event once, including later ones."""
    failing, fine = Recorder(default=(500, {}, b"")), Recorder()
    with serving(failing.app()) as a, serving(fine.app()) as b:
        config = gateway(
            storage_url, [{"url": a.url + "/a", **HOOK}, {"url": b.url + "/b", **HOOK}]
        )

        async def scenario(storage: AsyncStorage) -> None:
            async with httpx.AsyncClient() as http:
                worker = Worker(config, storage, clock, http)
                e1 = await emit(storage, "acme", "balance.low", {}, int(clock() * 1000))
                await worker.run_once()
                e2 = await emit(storage, "acme", "balance.low", {}, int(clock() * 1000))
                clock.advance(10)
                await worker.run_once()
                clock.advance(400)
                await worker.run_once()
            assert fine.ids() == [e1, e2]
            assert sorted(failing.ids()) == [e1, e1, e1, e2, e2]
            assert await pending(storage) == 2

        run(scenario, storage_url)


def test_two_workers_deliver_each_event_once(
    storage_url: str, clock: Clock, receiver: tuple[Recorder, Server]
) -> None:
    """Two workers running passes at the same time deliver every event exactly once."""
    recorder, server = receiver
    config = gateway(storage_url, [{"url": server.url + "/hook", **HOOK}])
    settings = WorkerSettings(batch=3)

    async def scenario(storage: AsyncStorage) -> None:
        now_ms = int(clock() * 1000)
        ids = [await emit(storage, f"c{i % 7}", "balance.low", {}, now_ms) for i in range(40)]
        async with httpx.AsyncClient() as http:
            one = Worker(config, storage, clock, http, settings=settings, consumer="one")
            two = Worker(config, storage, clock, http, settings=settings, consumer="two")
            reads = [0, 0]
            for _ in range(8):
                r1, r2 = await asyncio.gather(one.run_once(), two.run_once())
                reads[0] += r1.read
                reads[1] += r2.read
        assert sorted(recorder.ids()) == sorted(ids)
        assert sum(reads) == 40 and min(reads) > 0
        assert await pending(storage) == 0

    run(scenario, storage_url)


def test_a_killed_workers_entries_are_reclaimed(
    storage_url: str, clock: Clock, receiver: tuple[Recorder, Server]
) -> None:
    """Entries a worker read and died on (before or mid-attempt) are taken over and delivered."""
    recorder, server = receiver
    config = gateway(storage_url, [{"url": server.url + "/hook", **HOOK}])
    settings = WorkerSettings(claim_idle_ms=150)
    started = asyncio.Event

    async def scenario(storage: AsyncStorage) -> None:
        now_ms = int(clock() * 1000)
        in_flight = started()

        async def hang(request: httpx.Request) -> httpx.Response:
            in_flight.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        e1 = await emit(storage, "acme", "balance.low", {}, now_ms)
        async with httpx.AsyncClient(transport=httpx.MockTransport(hang)) as stuck:
            doomed = Worker(config, storage, clock, stuck, settings=settings, consumer="doomed")
            task = asyncio.create_task(doomed.run_once())
            await asyncio.wait_for(in_flight.wait(), 10)
            task.cancel()  # killed mid-attempt: the entry stays pending, with no state
            await asyncio.gather(task, return_exceptions=True)
        e2 = await emit(storage, "bob", "balance.low", {}, now_ms)
        p = Keys("mg", 4).partition("bob")
        await storage.client.xreadgroup(GROUP, "crashed", {Keys("mg", 4).outbox(p): ">"})
        assert await pending(storage) == 2
        async with httpx.AsyncClient() as http:
            heir = Worker(config, storage, clock, http, settings=settings, consumer="heir")
            await asyncio.sleep(0.25)
            report = await heir.run_once()
        assert (report.reclaimed, report.delivered) == (2, 2)
        assert sorted(recorder.ids()) == sorted([e1, e2])
        assert await pending(storage) == 0

    run(scenario, storage_url)


def test_dead_letter_after_the_last_attempt(storage_url: str, clock: Clock) -> None:
    """After ten failed attempts the event is dead-lettered once and acknowledged."""
    recorder = Recorder(default=(500, {}, b""))
    with serving(recorder.app()) as server:
        config = gateway(storage_url, [{"url": server.url + "/hook", **HOOK}])

        async def scenario(storage: AsyncStorage) -> None:
            event_id = await emit(storage, "acme", "balance.low", {"amount": 1}, 0)
            async with httpx.AsyncClient() as http:
                worker = Worker(config, storage, clock, http)
                dead = 0
                for _ in range(12):
                    dead += (await worker.run_once()).dead_lettered
                    clock.advance(26 * 3600)
            assert recorder.ids() == [event_id] * 10
            assert dead == 1
            (letter,) = await dead_letters(storage)
            assert letter["id"] == event_id and letter["type"] == "balance.low"
            assert letter["reason"] == "gave up after 10 attempts: the receiver answered 500"
            assert json.loads(letter["data"])["amount"] == 1
            assert await pending(storage) == 0

        run(scenario, storage_url)


def test_trim_never_drops_an_undelivered_entry(storage_url: str, clock: Clock) -> None:
    """With no retention, only acknowledged entries are trimmed; pending and unread ones stay."""
    recorder = Recorder()
    with serving(recorder.app()) as server:
        config = gateway(storage_url, [{"url": server.url + "/hook", **HOOK}])
        settings = WorkerSettings(outbox_retention_ms=0)

        async def scenario(storage: AsyncStorage) -> None:
            keys = Keys("mg", 4)
            outbox = keys.outbox(keys.partition("acme"))
            now_ms = int(clock() * 1000)
            async with httpx.AsyncClient() as http:
                worker = Worker(config, storage, clock, http, settings=settings)
                failed = await emit(storage, "acme", "balance.low", {"fail": 1}, now_ms)
                delivered = await emit(storage, "acme", "balance.low", {}, now_ms)
                recorder.fail_when = b'"fail":1'
                await worker.run_once()
                recorder.fail_when = None
                assert sorted(recorder.ids()) == [failed, delivered]
                unread = await emit(storage, "acme", "balance.low", {}, now_ms)
                await worker.outbox.trim(keys.partition("acme"), 0, 86_400_000)
                left = [f["id"] for _, f in await storage.client.xrange(outbox)]
                # A stream trims from its start: the delivered entry after a pending one waits.
                assert left == [failed, delivered, unread]
                clock.advance(10)
                await worker.run_once()
                await worker.outbox.trim(keys.partition("acme"), 0, 86_400_000)
            assert sorted(recorder.ids()) == sorted([failed, delivered, failed, unread])
            assert await storage.client.xlen(outbox) == 0

        run(scenario, storage_url)


def test_claim_refuses_an_entry_its_live_owner_holds(storage_url: str) -> None:
    """Another consumer cannot claim an entry its owner touched recently; the owner always can."""

    async def scenario(storage: AsyncStorage) -> None:
        event_id = await emit(storage, "acme", "balance.low", {}, 0)
        keys = WorkerKeys(Keys("mg", 4))
        p = keys.keys.partition("acme")
        owner, other = Outbox(storage, keys, "owner"), Outbox(storage, keys, "other")
        (event,) = await owner.read_new(p, 10)
        assert await other.claim(p, event.stream_id, 60_000) is None
        mine = await owner.claim(p, event.stream_id, 60_000)
        assert mine is not None and mine.id == event_id
        taken = await other.claim(p, event.stream_id, 0)
        assert taken is not None and taken.id == event_id
        assert await other.settle(event, {}, {}, 0, dead_maxlen=10, state_ttl_s=10) is None
        assert await owner.claim(p, event.stream_id, 0) is None  # acknowledged: gone

    run(scenario, storage_url)


def test_run_delivers_until_stopped_and_reports_liveness(
    storage_url: str, clock: Clock, receiver: tuple[Recorder, Server]
) -> None:
    """`run` keeps passing (pausing with the injected sleep) until its stop event is set."""
    recorder, server = receiver
    config = gateway(storage_url, [{"url": server.url + "/hook", **HOOK}])

    async def scenario(storage: AsyncStorage) -> None:
        pauses: list[float] = []

        async def sleep(seconds: float) -> None:
            pauses.append(seconds)
            await asyncio.sleep(0.005)

        stop = asyncio.Event()
        async with httpx.AsyncClient() as http:
            worker = Worker(config, storage, clock, http, sleep=sleep, consumer="runner")
            task = asyncio.create_task(worker.run(stop))
            event_id = await emit(storage, "acme", "balance.low", {}, 0)
            for _ in range(400):
                if recorder.requests:
                    break
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.wait_for(task, 10)
            alive = await alive_workers(storage, Keys("mg", 4), int(clock() * 1000))
        assert recorder.ids() == [event_id]
        assert pauses and set(pauses) <= {0.0, 1.0}
        assert alive == ["runner"]

    run(scenario, storage_url)


def test_run_waits_out_a_storage_outage() -> None:
    """With storage unreachable, `run` backs off (doubling pauses) instead of failing."""
    from conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    config = gateway(url, [{"url": "http://127.0.0.1:9/hook", **HOOK}])

    async def scenario(storage: AsyncStorage) -> None:
        pauses: list[float] = []
        stop = asyncio.Event()

        async def sleep(seconds: float) -> None:
            pauses.append(seconds)
            if len(pauses) == 3:
                stop.set()

        async with httpx.AsyncClient() as http:
            worker = Worker(config, storage, Clock(), http, sleep=sleep)
            await asyncio.wait_for(worker.run(stop), 30)
        assert pauses == [2.0, 4.0, 8.0]

    run(scenario, url)


def test_run_worker_entry_point_delivers_a_meters_events(
    storage_url: str, clock: Clock, receiver: tuple[Recorder, Server]
) -> None:
    """`run_worker(meter, stop)`, as `serve` and the CLI start it, delivers the meter's events."""
    recorder, server = receiver
    spec = {
        "storage": {"url": storage_url, "partitions": 4, "timeout_ms": 2000},
        "customers": {"acme": customer("p", credits={})},
        "metrics": counters("calls"),
        "plans": {"p": plan(calls=asset(tier(0), period="month"))},
        "webhooks": [{"url": server.url + "/hook", **HOOK}],
    }

    async def main() -> None:
        meter = AsyncMeter(spec, clock=clock)
        try:
            await meter.topup("acme", "credits", 5)
            stop = asyncio.Event()
            fast = WorkerSettings(poll_interval_s=0.02)
            task = asyncio.create_task(run_worker(meter, stop, settings=fast))
            for _ in range(500):
                if recorder.requests or task.done():
                    break
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.wait_for(task, 10)
        finally:
            await meter.aclose()
            pool = getattr(meter.storage.client, "connection_pool", None)
            if pool is not None:
                await pool.disconnect()

    asyncio.run(main())
    (request,) = recorder.requests
    assert request.json()["type"] == "balance.topped_up"
    assert verify(request.body, request.headers, SECRET, now=clock())["data"]["amount"] == 5
