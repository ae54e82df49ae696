"""What must still reach storage after it failed, drained by a background task once it answers.

Two kinds of work wait here: refunds of admissions whose reply never came (the client was told
503; the admission may still arrive, or may already have been applied) and requests let through
unmetered while storage was down (`on_failure: open`). A refund is idempotent by the admission's
attempt id and voids an admission that arrives after it; a deferred request is recorded under the
attempt id of its lost admission, so it is charged once whether or not that admission arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from metergate.core.errors import StorageUnavailable
from metergate.core.flows import ALREADY_APPLIED
from metergate.core.http import Deferred
from metergate.core.model import Decision, Ticket
from metergate.meter import AsyncMeter, Meter
from metergate.observability import ADMISSIONS_UNKNOWN

__all__ = ["Cancel", "Recovery", "Refund", "ThreadRecovery"]

logger = logging.getLogger("metergate")

BUFFER = 100_000
GIVE_UP_S = 540.0  # before the admission's undo record (600 s) expires
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 2.0


@dataclass(frozen=True, slots=True)
class Refund:
    """Undo (or void) the admission `attempt` of `customer`."""

    customer: str
    attempt: str
    operation: str
    since: float


@dataclass(frozen=True, slots=True)
class Cancel:
    """Undo (or void) the reservation made with `key` on a balance, whose reply was lost."""

    customer: str
    balance: str
    key: str
    since: float


def _late_hold(decision: Decision, job: Deferred) -> Ticket | None:
    """The hold a late admission left for the response-priced metrics, to settle with the
    actual units (None when the deferred record was itself the admission)."""
    ticket = decision.ticket
    if decision.detail != ALREADY_APPLIED or ticket is None or not job.actuals:
        return None
    return Ticket(
        ticket.customer,
        ticket.plan,
        ticket.hold_id,
        dict(job.actuals),
        {},
        attempt=ticket.attempt,
    )


class Recovery:
    """A bounded queue of refunds and deferred requests, drained in order by one task."""

    def __init__(self, meter: AsyncMeter, size: int = BUFFER) -> None:
        self.meter = meter
        self.jobs: deque[Refund | Deferred | Cancel] = deque()
        self.size = size
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self.jobs)

    def refund(self, customer: str, attempt: str, operation: str = "") -> None:
        """Queue the refund of an admission; it runs as soon as storage answers."""
        self._add(Refund(customer, attempt, operation, time.monotonic()))

    def record(self, item: Deferred) -> None:
        """Queue a request let through unmetered; it is recorded as soon as storage answers."""
        self._add(item)

    def cancel(self, customer: str, balance: str, key: str) -> None:
        """Queue the cancellation of a reservation whose reply was lost."""
        self._add(Cancel(customer, balance, key, time.monotonic()))

    def _add(self, job: Refund | Deferred | Cancel) -> None:
        if len(self.jobs) >= self.size:
            dropped = self.jobs.popleft()
            if isinstance(dropped, Refund):
                ADMISSIONS_UNKNOWN.inc()
            logger.error(
                "metergate: recovery buffer full (%d); dropped the oldest %s",
                self.size,
                "refund (its admission may stay charged)"
                if isinstance(dropped, Refund)
                else "unmetered request (it stays unrecorded)",
            )
        self.jobs.append(job)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        """Run the queued work in order, waiting (with backoff) while storage is unreachable."""
        backoff = FIRST_BACKOFF_S
        while self.jobs:
            job = self.jobs[0]
            try:
                await self._run(job)
            except (StorageUnavailable, TimeoutError):
                if isinstance(job, Refund | Cancel) and time.monotonic() - job.since > GIVE_UP_S:
                    self._unknown(self.jobs.popleft())
                    continue
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                continue
            except Exception:
                logger.exception("metergate: could not recover %r", job)
                if isinstance(job, Refund):
                    ADMISSIONS_UNKNOWN.inc()
            backoff = FIRST_BACKOFF_S
            self.jobs.popleft()

    async def _run(self, job: Refund | Deferred | Cancel) -> None:
        if isinstance(job, Refund):
            await self.meter.refund(job.customer, job.attempt, job.operation)
            return
        if isinstance(job, Cancel):
            await self.meter.cancel_reservation(job.customer, job.balance, job.key)
            return
        customer = job.customer
        if customer is None and job.api_key is not None:
            customer = await self.meter.customer_for_key(job.api_key)
        if customer is None:
            return
        decision = await self.meter.admit(
            customer, job.amounts, job.operation, attempt=job.attempt or None
        )
        late = _late_hold(decision, job)
        if late is not None:
            await self.meter.settle(late, job.actuals)
        if not decision.allowed:
            logger.warning(
                "metergate: a request let through while storage was down was refused "
                "afterwards (%s); it stays unrecorded",
                decision.problem,
            )

    def _unknown(self, job: Refund | Deferred | Cancel) -> None:
        if isinstance(job, Refund):
            ADMISSIONS_UNKNOWN.inc()
            logger.error(
                "metergate: the admission %s of customer %r could not be refunded (storage "
                "unreachable); it may stay charged",
                job.attempt,
                job.customer,
            )
        elif isinstance(job, Cancel):
            logger.error(
                "metergate: a reservation of %r whose reply was lost could not be cancelled; its "
                "hold lasts until it expires",
                job.customer,
            )
        else:
            logger.error("metergate: a request let through while storage was down stays unrecorded")

    async def close(self, timeout_s: float) -> None:
        """Drain for at most `timeout_s`; count and log what is left."""
        task = self._task
        if self.jobs and task is not None and not task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        while self.jobs:
            self._unknown(self.jobs.popleft())


class ThreadRecovery:
    """The same queue for the blocking middleware, drained by a daemon thread while non-empty."""

    def __init__(self, meter: Meter, size: int = BUFFER) -> None:
        self.meter = meter
        self.jobs: deque[Refund | Deferred] = deque()
        self.size = size
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self.jobs)

    def refund(self, customer: str, attempt: str, operation: str = "") -> None:
        """Queue the refund of an admission; it runs as soon as storage answers."""
        self._add(Refund(customer, attempt, operation, time.monotonic()))

    def record(self, item: Deferred) -> None:
        """Queue a request let through unmetered; it is recorded as soon as storage answers."""
        self._add(item)

    def _add(self, job: Refund | Deferred) -> None:
        with self._lock:
            if len(self.jobs) >= self.size:
                dropped = self.jobs.popleft()
                if isinstance(dropped, Refund):
                    ADMISSIONS_UNKNOWN.inc()
                logger.error("metergate: recovery buffer full (%d); dropped the oldest", self.size)
            self.jobs.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self.drain, name="metergate-recovery", daemon=True
                )
                self._thread.start()

    def drain(self) -> None:
        """Run the queued work in order, waiting (with backoff) while storage is unreachable."""
        backoff = FIRST_BACKOFF_S
        while True:
            with self._lock:
                if not self.jobs:
                    return
                job = self.jobs[0]
            try:
                self._run(job)
            except StorageUnavailable:
                if isinstance(job, Refund) and time.monotonic() - job.since > GIVE_UP_S:
                    ADMISSIONS_UNKNOWN.inc()
                    logger.error("metergate: the admission %s could not be refunded", job.attempt)
                    with self._lock:
                        self.jobs.popleft()
                    continue
                time.sleep(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                continue
            except Exception:
                logger.exception("metergate: could not recover %r", job)
                if isinstance(job, Refund):
                    ADMISSIONS_UNKNOWN.inc()
            backoff = FIRST_BACKOFF_S
            with self._lock:
                self.jobs.popleft()

    def _run(self, job: Refund | Deferred) -> None:
        if isinstance(job, Refund):
            self.meter.refund(job.customer, job.attempt, job.operation)
            return
        customer = job.customer
        if customer is None and job.api_key is not None:
            customer = self.meter.customer_for_key(job.api_key)
        if customer is None:
            return
        decision = self.meter.admit(
            customer, job.amounts, job.operation, attempt=job.attempt or None
        )
        late = _late_hold(decision, job)
        if late is not None:
            self.meter.settle(late, job.actuals)
        if not decision.allowed:
            logger.warning(
                "metergate: a request let through while storage was down was refused "
                "afterwards (%s); it stays unrecorded",
                decision.problem,
            )
