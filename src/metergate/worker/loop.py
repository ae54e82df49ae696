"""The background worker: cut usage reports, close idle periods, deliver the outboxes.

One pass (`run_once`) visits every partition: it reports the usage windows that ended, closes the
periods that ended, then delivers the partition's new entries, the entries due for a retry and the
entries a crashed worker left behind, and trims what was delivered. `run` repeats passes until
stopped. Any number of workers may run against the same storage: the consumer group hands each new
entry to one of them, and the scripts arbitrate everything else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import httpx
import redis

from metergate.config import GatewayConfig
from metergate.core.errors import StorageUnavailable
from metergate.core.keys import Keys
from metergate.storage import AsyncStorage
from metergate.worker.destinations import Destination, WebhookEndpoint
from metergate.worker.events import OutboxEvent
from metergate.worker.keys import WorkerKeys
from metergate.worker.outbox import Outbox
from metergate.worker.reports import PeriodCloser, UsageReporter
from metergate.worker.schedule import DeliveryState, Outcome, advance

__all__ = ["PassReport", "Worker", "WorkerSettings", "alive_workers"]

log = logging.getLogger("metergate.worker")

_MALFORMED = "outbox"
"""The destination id under which an entry that cannot be parsed is dead-lettered."""


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """Tuning of the worker; the defaults suit one worker or many."""

    poll_interval_s: float = 1.0
    """Pause between passes when there was nothing more to read."""
    batch: int = 100
    """Entries read (and retries and reclaims taken) per partition per pass."""
    max_in_flight: int = 32
    """Delivery attempts running at once, over all partitions."""
    partition_concurrency: int = 8
    """Partitions visited at once."""
    claim_idle_ms: int = 60_000
    """An entry idle this long may be taken over by another worker: longer than one attempt."""
    report_grace_ms: int = 5_000
    """A usage window is cut this long after its end (gateway clocks may lag that much)."""
    close_grace_ms: int = 30_000
    """A period with no traffic after its end is closed this long after the end."""
    outbox_retention_ms: int = 3_600_000
    """Delivered entries stay in the outbox this long (for `GET /v1/events` and redelivery)."""
    dead_letter_maxlen: int = 100_000
    """Each partition's dead-letter stream keeps about this many entries."""
    state_ttl_s: int = 8 * 86_400
    """Delivery state of an entry outlives its last scheduled retry by this much at most."""
    consumer_idle_ms: int = 86_400_000
    """Consumers (former workers) with nothing pending are forgotten after this long idle."""

    def __post_init__(self) -> None:
        if self.claim_idle_ms <= 0 or self.batch <= 0 or self.max_in_flight <= 0:
            raise ValueError("claim_idle_ms, batch and max_in_flight must be positive")


@dataclass(slots=True)
class PassReport:
    """What one pass did, summed over partitions."""

    read: int = 0
    """New entries read from the outboxes."""
    reclaimed: int = 0
    """Entries taken over from idle consumers (crashed workers, or waiting for a retry)."""
    delivered: int = 0
    """Successful attempts (one per event and destination)."""
    retrying: int = 0
    """Failed attempts that will be tried again."""
    dead_lettered: int = 0
    """(Event, destination) pairs given up on and copied to the dead letters."""
    acknowledged: int = 0
    """Entries done with: every destination delivered or dead-lettered."""
    reported: int = 0
    """`usage.reported` events emitted."""
    closed: int = 0
    """`period.closed` events emitted."""
    trimmed: int = 0
    """Delivered entries trimmed from the outboxes."""
    full: bool = False
    """Some partition had a full batch: more may be waiting."""

    def as_dict(self) -> dict[str, Any]:
        """Return the counters as a mapping (for logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def destinations_from_config(config: GatewayConfig) -> list[Destination]:
    """Build the webhook endpoints of the config."""
    return [WebhookEndpoint(w.url, w.secret, w.events) for w in config.webhooks]


class Worker:
    """Delivers the outboxes to the configured destinations, and cuts reports and period closes."""

    def __init__(
        self,
        config: GatewayConfig,
        storage: AsyncStorage,
        clock: Callable[[], float] = time.time,
        http_client: httpx.AsyncClient | None = None,
        *,
        destinations: Sequence[Destination] | None = None,
        extra_destinations: Iterable[Destination] = (),
        settings: WorkerSettings | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
        consumer: str | None = None,
    ) -> None:
        self.config = config
        self.storage = storage
        self.clock = clock
        self.settings = settings or WorkerSettings()
        self._own_client = http_client is None
        self.http = http_client or httpx.AsyncClient()
        base = list(destinations_from_config(config) if destinations is None else destinations)
        self.destinations: list[Destination] = [*base, *extra_destinations]
        ids = [d.id for d in self.destinations]
        if len(set(ids)) != len(ids):
            raise ValueError(f"two destinations share an id: {sorted(ids)}")
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.consumer = consumer or _consumer_name()
        self.keys = WorkerKeys(Keys(config.storage.prefix, config.storage.partitions))
        self.outbox = Outbox(storage, self.keys, self.consumer)
        self.reporter = UsageReporter(
            storage, self.keys, config.usage_report_interval, grace_ms=self.settings.report_grace_ms
        )
        self.closer = PeriodCloser(
            storage,
            self.keys,
            {name: m.type for name, m in config.metrics.items()},
            grace_ms=self.settings.close_grace_ms,
        )
        self.disabled: dict[str, str] = {}
        self._in_flight: set[tuple[int, str]] = set()
        self._attempts = asyncio.Semaphore(self.settings.max_in_flight)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- one pass ----------------------------------------------------------------------------

    async def run_once(self) -> PassReport:
        """Do one pass over every partition and return what it did."""
        report = PassReport()
        await self._refresh_disabled()
        gate = asyncio.Semaphore(self.settings.partition_concurrency)

        async def visit(partition: int) -> None:
            async with gate:
                await self._partition_pass(partition, report)

        results = await asyncio.gather(
            *(visit(p) for p in range(self.keys.partitions)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        await self._heartbeat()
        return report

    async def _partition_pass(self, p: int, report: PassReport) -> None:
        s = self.settings
        now_ms = self._now_ms()
        # Partitions run concurrently: add each count after its await, never across one.
        reported = await self.reporter.run(p, now_ms)
        report.reported += reported
        closed = await self.closer.run(p, now_ms)
        report.closed += closed

        # (event, read just now): the coroutines are made only once every read has succeeded.
        work: list[tuple[OutboxEvent, bool]] = []
        fresh = await self.outbox.read_new(p, s.batch)
        report.read += len(fresh)
        report.full = report.full or len(fresh) >= s.batch
        work += [(event, True) for event in fresh]
        for stream_id in await self.outbox.due_retries(p, now_ms, s.batch):
            if (p, stream_id) in self._in_flight:
                continue
            event = await self.outbox.claim(p, stream_id, s.claim_idle_ms)
            if event is not None:
                work.append((event, False))
        taken, deleted = await self.outbox.reclaim(p, s.claim_idle_ms, s.batch)
        if deleted:
            await self.outbox.forget(p, deleted)
        report.reclaimed += len(taken)
        work += [(event, False) for event in taken]
        results = await asyncio.gather(
            *(self._process(event, report, fresh=new) for event, new in work),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        trimmed = await self.outbox.trim(p, s.outbox_retention_ms, s.consumer_idle_ms)
        report.trimmed += trimmed

    async def _process(self, event: OutboxEvent, report: PassReport, *, fresh: bool) -> None:
        """Attempt every due destination of one entry, then record the pass (and maybe ack)."""
        key = (event.partition, event.stream_id)
        if key in self._in_flight:
            return
        self._in_flight.add(key)
        try:
            await self._deliver(event, report, fresh=fresh)
        finally:
            self._in_flight.discard(key)

    async def _deliver(self, event: OutboxEvent, report: PassReport, *, fresh: bool) -> None:
        now = self.clock()
        now_ms = int(now * 1000)
        stored = {} if fresh else await self.outbox.states(event.partition, event.stream_id)
        states: dict[str, DeliveryState] = {}
        reasons: dict[str, str] = {}
        due: list[tuple[Destination, DeliveryState | None]] = []
        if event.error is not None:
            states[_MALFORMED], reasons[_MALFORMED] = DeliveryState("dead"), event.error
        else:
            for dest in self.destinations:
                if (event.only and dest.id not in event.only) or not dest.wants(event):
                    continue
                state = stored.get(dest.id)
                if state is not None and (state.final or state.next_ms > now_ms):
                    states[dest.id] = state
                elif dest.id in self.disabled:
                    states[dest.id] = DeliveryState("dead", state.attempts if state else 0)
                    reasons[dest.id] = f"destination disabled: {self.disabled[dest.id]}"
                else:
                    due.append((dest, state))
        outcomes = await asyncio.gather(*(self._attempt(d, event, now) for d, _ in due))
        for (dest, before), outcome in zip(due, outcomes, strict=True):
            state, reason = advance(before, outcome, now_ms, jitter=self.rng.random())
            states[dest.id] = state
            if state.status == "ok":
                report.delivered += 1
            elif state.status == "retry":
                report.retrying += 1
                log.info("event %s to %s: %s; retrying", event.id, dest.id, outcome.reason)
            else:
                reasons[dest.id] = reason
                log.warning("event %s to %s dead-lettered: %s", event.id, dest.id, reason)
            if outcome.kind == "gone":
                await self._disable(dest, outcome.reason, now_ms)
        report.dead_lettered += sum(
            1 for d, s in states.items() if s.status == "dead" and stored.get(d) != s
        )
        pending = await self.outbox.settle(
            event,
            states,
            reasons,
            now_ms,
            dead_maxlen=self.settings.dead_letter_maxlen,
            state_ttl_s=self.settings.state_ttl_s,
        )
        if pending is None:
            report.acknowledged += 1

    async def _attempt(self, dest: Destination, event: OutboxEvent, now: float) -> Outcome:
        async with self._attempts:
            try:
                return await dest.send(event, self.http, now)
            except Exception as exc:  # a destination's bug must not stop the other deliveries
                log.exception("destination %s failed on event %s", dest.id, event.id)
                return Outcome("retry", f"{type(exc).__name__}: {exc}"[:300])

    # -- disabled destinations ---------------------------------------------------------------

    async def _refresh_disabled(self) -> None:
        raw = await self._redis(self.storage.client.hgetall(self.keys.disabled))
        self.disabled = {str(k): str(v) for k, v in (raw or {}).items()}

    async def _disable(self, dest: Destination, reason: str, now_ms: int) -> None:
        note = json.dumps({"reason": reason, "at": now_ms, "destination": repr(dest)})
        await self._redis(self.storage.client.hset(self.keys.disabled, dest.id, note))
        self.disabled[dest.id] = note
        log.warning("destination %r disabled: %s", dest, reason)

    async def enable(self, destination_id: str) -> bool:
        """Enable a destination disabled by a 410 again; return whether it was disabled."""
        removed = await self._redis(self.storage.client.hdel(self.keys.disabled, destination_id))
        self.disabled.pop(destination_id, None)
        return bool(removed)

    # -- liveness ----------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        now_ms = self._now_ms()
        client = self.storage.client
        await self._redis(client.zadd(self.keys.workers, {self.consumer: now_ms}))
        await self._redis(client.zremrangebyscore(self.keys.workers, "-inf", now_ms - 86_400_000))

    async def _redis(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise StorageUnavailable(str(exc) or type(exc).__name__) from exc

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run passes until `stop` is set; storage outages are waited out with a backoff."""
        failures = 0
        while not stop.is_set():
            try:
                report = await self.run_once()
            except (StorageUnavailable, redis.RedisError) as exc:
                failures += 1
                delay = min(self.settings.poll_interval_s * 2**failures, 30.0)
                log.warning("worker pass failed (%s); next try in %.1f s", exc, delay)
            else:
                failures = 0
                delay = 0.0 if report.full else self.settings.poll_interval_s
            await self._pause(delay, stop)

    async def _pause(self, delay: float, stop: asyncio.Event) -> None:
        sleeper = asyncio.ensure_future(self.sleep(delay))
        stopper = asyncio.ensure_future(stop.wait())
        _, pending = await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def aclose(self) -> None:
        """Close the HTTP client if the worker made it."""
        if self._own_client:
            await self.http.aclose()

    async def __aenter__(self) -> Worker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def alive_workers(
    storage: AsyncStorage, keys: Keys, now_ms: int, within_ms: int = 30_000
) -> list[str]:
    """Return the consumers that finished a pass within `within_ms` (for a health check)."""
    wkeys = WorkerKeys(keys)
    found = await storage.client.zrangebyscore(wkeys.workers, now_ms - within_ms, "+inf")
    return [str(x) for x in found]
