"""Programmatic metering: `Meter` (blocking) and `AsyncMeter` (asyncio), two loops over one core."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from metergate.config import BalanceConfig, CustomerConfig, GatewayConfig, load_config, parse_config
from metergate.core.allowances import Allowance, Book, Key
from metergate.core.errors import InvalidAmount, StorageUnavailable
from metergate.core.flows import Flow, MeterCore
from metergate.core.model import AssetUsage, BalanceState, Decision, Ticket
from metergate.storage import AsyncStorage, SyncStorage, open_async, open_sync

__all__ = ["AsyncMeter", "ConfigSource", "Meter", "as_config"]

logger = logging.getLogger("metergate")

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
ConfigSource = GatewayConfig | Mapping[str, Any] | str | os.PathLike[str]


def _retrieve(task: asyncio.Task[None]) -> None:
    """Done callback of a set-up whose callers may all have stopped waiting: its failure reached
    whoever still waited, and is not logged as never retrieved."""
    if not task.cancelled():
        task.exception()


def _validated(model: type[M], spec: Any, field: str) -> M:
    """Validate an input model, raising InvalidAmount naming the first bad field."""
    if isinstance(spec, model):
        return spec
    try:
        return model.model_validate(spec)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = ".".join(str(p) for p in err["loc"]) or field
        raise InvalidAmount(path, err["msg"].removeprefix("Value error, ")) from None


def as_config(config: ConfigSource) -> GatewayConfig:
    """Accept a GatewayConfig, a mapping or a file path and return the validated config."""
    if isinstance(config, GatewayConfig):
        return config
    if isinstance(config, Mapping):
        return parse_config(config)
    return load_config(config)


class Meter:
    """Meter usage and move credits over the configured storage, blocking."""

    def __init__(
        self,
        config: ConfigSource,
        clock: Callable[[], float] | None = None,
        *,
        storage: SyncStorage | None = None,
    ) -> None:
        self.config = as_config(config)
        self.core = MeterCore(self.config, clock or time.time)
        self.storage = storage or open_sync(self.config.storage)
        self._bootstrap_lock = threading.Lock()
        # Local allowances (SPEC section 2): the book, one grant at a time per key, the flusher.
        allowances = self.config.allowances
        self.book: Book | None = Book(allowances) if allowances.enabled else None
        self._grant_locks: dict[Key, threading.Lock] = {}
        self._flusher: threading.Thread | None = None
        self._flusher_lock = threading.Lock()
        self._stopping = threading.Event()

    def run(self, flow: Flow[T]) -> T:
        """Run one operation flow of the core (a generator of storage calls) to its result."""
        return self._drive(flow)

    def _drive(self, flow: Flow[T]) -> T:
        if not self.core.bootstrapped:
            with self._bootstrap_lock:
                if not self.core.bootstrapped:
                    self._run(self.core.bootstrap())
        return self._run(flow)

    def _run(self, flow: Flow[T]) -> T:
        try:
            call = next(flow)
            while True:
                call = flow.send(self.storage.run(call))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def admit(
        self,
        customer: str,
        amounts: Mapping[str, int],
        idempotency_key: str | None = None,
        *,
        estimates: Mapping[str, int] | None = None,
        hold_ttl_s: int = 300,
        lease_ttl_s: int | None = None,
        attempt: str | None = None,
        operation: str | None = None,
        hold_ttl_ms: int | None = None,
        lease_ttl_ms: int | None = None,
    ) -> Decision:
        """Decide and record one admission of (metric, amount) pairs, all or nothing.

        Hold and lease lifetimes may be given in seconds or, exactly, in milliseconds (`_ms`
        wins when both are given)."""
        return self._drive(
            self.core.admit(
                customer,
                amounts,
                idempotency_key,
                estimates=estimates,
                hold_ttl_ms=hold_ttl_ms if hold_ttl_ms is not None else hold_ttl_s * 1000,
                lease_ttl_ms=_lease_ms(lease_ttl_s, lease_ttl_ms),
                attempt=attempt,
                operation=operation,
            )
        )

    def admit_request(
        self,
        customer: str,
        amounts: Mapping[str, int],
        *,
        attempt: str | None = None,
        hold_ttl_ms: int | None = None,
        lease_ttl_ms: int | None = None,
    ) -> Decision:
        """Admit one gateway request of fixed amounts: from this process's allowance when
        allowances are on and its assets allow it, else per request in storage.

        Its ticket ends the request either way: `settle` it, or `refund_ticket` it."""
        book = self.book
        if book is not None and amounts and min(amounts.values()) > 0:
            key: Key = (customer, tuple(amounts.items()))
            decision = book.take(key, time.monotonic())
            if decision is not None:
                return decision
            now = time.monotonic()
            if not book.cold(key, now) and book.busy(key, now):
                # a grant emptied by the threads that waited for it is taken again, twice
                for _round in range(3):
                    if not self._grant(book, key, amounts):
                        break
                    decision = book.take(key, time.monotonic())
                    if decision is not None:
                        return decision
        return self.admit(
            customer,
            amounts,
            hold_ttl_ms=hold_ttl_ms,
            lease_ttl_ms=lease_ttl_ms,
            attempt=attempt,
        )

    def _grant(self, book: Book, key: Key, amounts: Mapping[str, int]) -> bool:
        """Take an allowance for `key`, one grant at a time: the threads arriving meanwhile wait
        for it, then take from it. Returns whether there is one to take from."""
        lock = self._grant_locks.setdefault(key, threading.Lock())
        if not lock.acquire(blocking=False):
            with lock:  # another thread is taking one: use it
                return book.take_peek(key, time.monotonic())
        try:
            if book.take_peek(key, time.monotonic()):
                return True
            # what this process's closed allowances used counts before the new one is sized
            self._settle_allowances(book, book.ready(key[0]))
            wanted = book.wanted(key, amounts)
            ttl_ms = self.config.allowances.ttl
            decision = self._drive(self.core.grant(key[0], amounts, wanted, ttl_ms))
            book.opened(key, decision, amounts, time.monotonic())
            if decision.problem == "none":
                # at a boundary: the request that meets it goes per request, and it must see
                # every unit this process gave, for its decision and its events
                self.sync(key[0])
        finally:
            lock.release()
        self._start_flusher(book)
        return decision.allowed

    def _start_flusher(self, book: Book) -> None:
        with self._flusher_lock:
            if self._flusher is not None and self._flusher.is_alive():
                return
            if self._flusher is None:
                # A WSGI server has no shutdown hook: settle at interpreter exit (a worker
                # recycled by its server), so that what was given is charged.
                atexit.register(_settle_at_exit, weakref.ref(self))
            self._flusher = threading.Thread(
                target=self._flush_forever, args=(book,), name="metergate-allowances", daemon=True
            )
            self._flusher.start()

    def _flush_forever(self, book: Book) -> None:
        """Settle the allowances whose time is up, every quarter of `flush_ms`, while any is held."""
        tick = max(book.flush_s / 4, 0.005)
        while len(book) and not self._stopping.wait(tick):
            try:
                self._settle_allowances(book, book.due(time.monotonic()))
            except Exception:  # never let the flusher die: what failed is kept and retried
                logger.exception("metergate: settling allowances failed")

    def _settle_allowances(self, book: Book, due: list[Allowance]) -> None:
        for allowance in due:
            try:
                self._drive(self.core.settle(allowance.hold, allowance.used()))
            except (StorageUnavailable, TimeoutError):
                # the settlement is idempotent (by its hold id): try again at the next tick
                if not self._stopping.is_set():
                    book.retry(allowance)

    def sync(self, customer: str | None = None) -> None:
        """Settle this process's allowances of `customer` (all of them without one) now, so
        that what storage says next counts every request this process has given."""
        book = self.book
        if book is None or not len(book):
            return
        if customer is not None and not book.holds(customer):
            return
        now = time.monotonic()
        self._settle_allowances(book, book.due(now, customer=customer, everything=customer is None))

    def settle(self, ticket: Ticket, actuals: Mapping[str, int] | None = None) -> Decision:
        """Record the actual units of an admission's estimates and end its leases."""
        if ticket.allowance is not None and self.book is not None:
            self.book.finish(ticket, refunded=False)
            return Decision(True, 200, None, ticket.customer)
        return self._drive(self.core.settle(ticket, actuals))

    def refund_ticket(self, ticket: Ticket) -> str:
        """Undo the admission a ticket came from, once (see `refund`)."""
        if ticket.allowance is not None and self.book is not None:
            self.book.finish(ticket, refunded=True)
            return "refunded"
        return self.refund(ticket.customer, ticket.attempt, ticket.operation)

    def refund(self, customer: str, attempt: str, operation: str = "") -> str:
        """Undo an admission once (units, charge, holds, leases), or void it if it has not arrived.

        Returns 'refunded', 'void' or 'done' (refunded before)."""
        return self._drive(self.core.refund(customer, attempt, operation))

    def record(
        self, customer: str, metric: str, value: int, idempotency_key: str | None = None
    ) -> Decision:
        """Record usage outside a request (add, Gauge reading, running total, signed delta)."""
        self.sync(customer)
        return self._drive(self.core.record(customer, metric, value, idempotency_key))

    def usage(self, customer: str, metric: str) -> dict[str, object]:
        """Return one asset's usage fields, as `GET /v1/customers/{id}/usage` shows them."""
        self.sync(customer)
        return self._drive(self.core.usage(customer, metric)).as_dict()

    def asset(self, customer: str, metric: str) -> AssetUsage:
        """Return one asset's usage as an AssetUsage."""
        self.sync(customer)
        return self._drive(self.core.usage(customer, metric))

    def suspend_asset(self, customer: str, metric: str) -> AssetUsage:
        """Suspend an asset: every admission on it is refused with 403 until resumed."""
        self.sync(customer)
        return self._drive(self.core.suspend_asset(customer, metric))

    def resume_asset(self, customer: str, metric: str) -> AssetUsage:
        """Resume a suspended asset."""
        self.sync(customer)
        return self._drive(self.core.suspend_asset(customer, metric, resume=True))

    def set_entitlement(
        self,
        customer: str,
        plan: str,
        anchor: datetime | None = None,
        timezone: str | None = None,
    ) -> None:
        """Change a customer's plan (effective now), anchor or timezone."""
        self.sync(customer)
        self._drive(self.core.set_entitlement(customer, plan, anchor, timezone))

    def put_customer(self, customer: str, spec: CustomerConfig | Mapping[str, Any]) -> None:
        """Create or replace a customer; missing balances are created, existing ones kept."""
        self.sync(customer)
        spec = _validated(CustomerConfig, spec, "customer")
        self._drive(self.core.put_customer(customer, spec))

    def create_balance(
        self, customer: str, name: str, spec: BalanceConfig | Mapping[str, Any]
    ) -> BalanceState:
        """Create a balance (its amount is written once) or update an existing one's settings."""
        self.sync(customer)
        spec = _validated(BalanceConfig, spec, "balance")
        return self._drive(self.core.create_balance(customer, name, spec))

    def balance(self, customer: str, name: str) -> BalanceState:
        """Return a balance: amount, held, available, overage, unit, suspended."""
        self.sync(customer)
        return self._drive(self.core.balance_op(customer, name, "read"))

    def topup(
        self, customer: str, name: str, amount: int, idempotency_key: str | None = None
    ) -> BalanceState:
        """Add credit to a balance, once per idempotency key."""
        self.sync(customer)
        return self._drive(self.core.balance_op(customer, name, "topup", amount, idempotency_key))

    def withdraw(
        self, customer: str, name: str, amount: int, idempotency_key: str | None = None
    ) -> BalanceState:
        """Take credit out of a balance, never below 0 available (raises Conflict otherwise)."""
        self.sync(customer)
        return self._drive(
            self.core.balance_op(customer, name, "withdraw", amount, idempotency_key)
        )

    def suspend_balance(self, customer: str, name: str) -> BalanceState:
        """Suspend a balance: admissions charging it are refused with 403."""
        self.sync(customer)
        return self._drive(self.core.balance_op(customer, name, "suspend"))

    def resume_balance(self, customer: str, name: str) -> BalanceState:
        """Resume a suspended balance."""
        self.sync(customer)
        return self._drive(self.core.balance_op(customer, name, "resume"))

    def reserve(
        self,
        customer: str,
        name: str,
        amount: int,
        ttl_s: int,
        idempotency_key: str | None = None,
    ) -> str:
        """Hold `amount` on a balance for `ttl_s` seconds and return the reservation id (once per
        idempotency key)."""
        self.sync(customer)
        return self._drive(self.core.reserve(customer, name, amount, ttl_s, idempotency_key))[0]

    def cancel_reservation(self, customer: str, name: str, idempotency_key: str) -> str:
        """Undo a keyed reservation whose reply was lost: release its hold, or void it if it has
        not arrived yet ('voided', 'released' or 'closed')."""
        return self._drive(self.core.cancel_reservation(customer, name, idempotency_key))

    def commit(
        self, reservation_id: str, amount: int, idempotency_key: str | None = None
    ) -> BalanceState:
        """Charge the actual amount of a reservation and release the rest (once)."""
        return self._drive(
            self.core.close_reservation(reservation_id, "commit", amount, idempotency_key)
        )

    def release(self, reservation_id: str, idempotency_key: str | None = None) -> BalanceState:
        """Release a reservation's hold (once)."""
        return self._drive(
            self.core.close_reservation(reservation_id, "release", 0, idempotency_key)
        )

    def ledger(self, customer: str, limit: int = 100) -> list[dict[str, Any]]:
        """Return the customer's balance mutations, newest first."""
        self.sync(customer)
        return self._drive(self.core.ledger(customer, limit))

    def customer_for_key(self, api_key: str) -> str | None:
        """Return the customer holding an API key, or None."""
        return self._drive(self.core.customer_for_key(api_key))

    def add_api_key(self, customer: str, api_key: str) -> str:
        """Store the hash of a new API key for a customer and return the hash."""
        return self._drive(self.core.add_api_key(customer, api_key))

    def close(self) -> None:
        """Settle every allowance, then close the storage connections."""
        self._stopping.set()
        if self.book is not None and len(self.book):
            try:
                self.sync()
            except Exception:  # the holds expire on their own: nothing unadmitted is charged
                logger.exception("metergate: settling allowances at shutdown failed")
        self.storage.close()

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncMeter:
    """Meter usage and move credits over the configured storage, with asyncio."""

    def __init__(
        self,
        config: ConfigSource,
        clock: Callable[[], float] | None = None,
        *,
        storage: AsyncStorage | None = None,
    ) -> None:
        self.config = as_config(config)
        self.core = MeterCore(self.config, clock or time.time)
        self.storage = storage or open_async(self.config.storage)
        self._starting: asyncio.Task[None] | None = None
        self._closed = False
        # Local allowances (SPEC section 2): the book, the grant in flight per key, the flusher.
        allowances = self.config.allowances
        self.book: Book | None = Book(allowances) if allowances.enabled else None
        self._grants: dict[Key, asyncio.Future[bool]] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect to storage and load the configured customers, once, shared by every caller.

        The first call of a process does this itself; a server calls it at start-up so that the
        first requests find it done. The set-up is a task of its own: a caller that stops waiting
        (a request out of budget) leaves it running for the others, so that a slow start delays
        the first requests instead of failing all of them. Each storage call in it is bounded by
        its own timeout; a set-up that failed is tried again by the next caller.
        """
        if self.core.bootstrapped:
            return
        if self._closed:
            raise StorageUnavailable("this meter is closed")
        loop = asyncio.get_running_loop()
        task = self._starting
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._starting = loop.create_task(self._start())
            task.add_done_callback(_retrieve)
        await asyncio.shield(task)

    async def _start(self) -> None:
        await self.storage.start()
        if not self.core.bootstrapped:
            await self._run(self.core.bootstrap())

    async def run(self, flow: Flow[T]) -> T:
        """Run one operation flow of the core (a generator of storage calls) to its result."""
        return await self._drive(flow)

    async def _drive(self, flow: Flow[T]) -> T:
        if self._closed:
            # A call after aclose (a settlement finishing during shutdown, say) would open a
            # connection nobody closes.
            flow.close()
            raise StorageUnavailable("this meter is closed")
        if not self.core.bootstrapped:
            await self.start()
        return await self._run(flow)

    async def _run(self, flow: Flow[T]) -> T:
        try:
            call = next(flow)
            while True:
                call = flow.send(await self.storage.run(call))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def admit(
        self,
        customer: str,
        amounts: Mapping[str, int],
        idempotency_key: str | None = None,
        *,
        estimates: Mapping[str, int] | None = None,
        hold_ttl_s: int = 300,
        lease_ttl_s: int | None = None,
        attempt: str | None = None,
        operation: str | None = None,
        hold_ttl_ms: int | None = None,
        lease_ttl_ms: int | None = None,
    ) -> Decision:
        """Decide and record one admission of (metric, amount) pairs, all or nothing.

        Hold and lease lifetimes may be given in seconds or, exactly, in milliseconds (`_ms`
        wins when both are given)."""
        return await self._drive(
            self.core.admit(
                customer,
                amounts,
                idempotency_key,
                estimates=estimates,
                hold_ttl_ms=hold_ttl_ms if hold_ttl_ms is not None else hold_ttl_s * 1000,
                lease_ttl_ms=_lease_ms(lease_ttl_s, lease_ttl_ms),
                attempt=attempt,
                operation=operation,
            )
        )

    async def admit_request(
        self,
        customer: str,
        amounts: Mapping[str, int],
        *,
        attempt: str | None = None,
        hold_ttl_ms: int | None = None,
        lease_ttl_ms: int | None = None,
    ) -> Decision:
        """Admit one gateway request of fixed amounts: from this process's allowance when
        allowances are on and its assets allow it, else per request in storage.

        Its ticket ends the request either way: `settle` it, or `refund` it."""
        book = self.book
        if book is not None and amounts and min(amounts.values()) > 0:
            key: Key = (customer, tuple(amounts.items()))
            decision = book.take(key, time.monotonic())
            if decision is not None:
                return decision
            now = time.monotonic()
            if not book.cold(key, now) and book.busy(key, now):
                # a grant emptied by the requests that waited for it is taken again, twice
                for _round in range(3):
                    if not await self._grant(book, key, amounts):
                        break
                    decision = book.take(key, time.monotonic())
                    if decision is not None:
                        return decision
        return await self.admit(
            customer,
            amounts,
            hold_ttl_ms=hold_ttl_ms,
            lease_ttl_ms=lease_ttl_ms,
            attempt=attempt,
        )

    async def _grant(self, book: Book, key: Key, amounts: Mapping[str, int]) -> bool:
        """Take an allowance for `key`, one grant at a time: the requests arriving meanwhile
        wait for it instead of sending their own."""
        pending = self._grants.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._take_allowance(book, key, amounts))
            self._grants[key] = pending
            pending.add_done_callback(lambda _f: self._grants.pop(key, None))
        return await asyncio.shield(pending)

    async def _take_allowance(self, book: Book, key: Key, amounts: Mapping[str, int]) -> bool:
        # what this process's closed allowances used counts before the new one is sized
        await self._settle_allowances(book, book.ready(key[0]))
        wanted = book.wanted(key, amounts)
        ttl_ms = self.config.allowances.ttl
        decision = await self._drive(self.core.grant(key[0], amounts, wanted, ttl_ms))
        book.opened(key, decision, amounts, time.monotonic())
        if decision.problem == "none":
            # at a boundary: the request that meets it goes per request, and it must see every
            # unit this process gave, for its decision and its events
            await self.sync(key[0])
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_forever(book))
        return decision.allowed

    async def _flush_forever(self, book: Book) -> None:
        """Settle the allowances whose time is up, every quarter of `flush_ms`, while any is held."""
        tick = max(book.flush_s / 4, 0.005)
        while len(book):
            await asyncio.sleep(tick)
            try:
                await self._settle_allowances(book, book.due(time.monotonic()))
            except Exception:  # never let the flusher die: what failed is kept and retried
                logger.exception("metergate: settling allowances failed")

    async def _settle_allowances(self, book: Book, due: list[Allowance]) -> None:
        for allowance in due:
            try:
                await self._drive(self.core.settle(allowance.hold, allowance.used()))
            except (StorageUnavailable, TimeoutError):
                # the settlement is idempotent (by its hold id): try again at the next tick
                if not self._closed:
                    book.retry(allowance)

    async def sync(self, customer: str | None = None) -> None:
        """Settle this process's allowances of `customer` (all of them without one) now, so
        that what storage says next counts every request this process has given."""
        book = self.book
        if book is None or not len(book):
            return
        if customer is not None and not book.holds(customer):
            return
        now = time.monotonic()
        await self._settle_allowances(
            book, book.due(now, customer=customer, everything=customer is None)
        )

    async def settle(self, ticket: Ticket, actuals: Mapping[str, int] | None = None) -> Decision:
        """Record the actual units of an admission's estimates and end its leases."""
        if ticket.allowance is not None and self.book is not None:
            self.book.finish(ticket, refunded=False)
            return Decision(True, 200, None, ticket.customer)
        return await self._drive(self.core.settle(ticket, actuals))

    async def refund_ticket(self, ticket: Ticket) -> str:
        """Undo the admission a ticket came from, once (see `refund`)."""
        if ticket.allowance is not None and self.book is not None:
            self.book.finish(ticket, refunded=True)
            return "refunded"
        return await self.refund(ticket.customer, ticket.attempt, ticket.operation)

    async def refund(self, customer: str, attempt: str, operation: str = "") -> str:
        """Undo an admission once (units, charge, holds, leases), or void it if it has not arrived.

        Returns 'refunded', 'void' or 'done' (refunded before)."""
        return await self._drive(self.core.refund(customer, attempt, operation))

    async def record(
        self, customer: str, metric: str, value: int, idempotency_key: str | None = None
    ) -> Decision:
        """Record usage outside a request (add, Gauge reading, running total, signed delta)."""
        await self.sync(customer)
        return await self._drive(self.core.record(customer, metric, value, idempotency_key))

    async def usage(self, customer: str, metric: str) -> dict[str, object]:
        """Return one asset's usage fields, as `GET /v1/customers/{id}/usage` shows them."""
        await self.sync(customer)
        return (await self._drive(self.core.usage(customer, metric))).as_dict()

    async def asset(self, customer: str, metric: str) -> AssetUsage:
        """Return one asset's usage as an AssetUsage."""
        await self.sync(customer)
        return await self._drive(self.core.usage(customer, metric))

    async def suspend_asset(self, customer: str, metric: str) -> AssetUsage:
        """Suspend an asset: every admission on it is refused with 403 until resumed."""
        await self.sync(customer)
        return await self._drive(self.core.suspend_asset(customer, metric))

    async def resume_asset(self, customer: str, metric: str) -> AssetUsage:
        """Resume a suspended asset."""
        await self.sync(customer)
        return await self._drive(self.core.suspend_asset(customer, metric, resume=True))

    async def set_entitlement(
        self,
        customer: str,
        plan: str,
        anchor: datetime | None = None,
        timezone: str | None = None,
    ) -> None:
        """Change a customer's plan (effective now), anchor or timezone."""
        await self.sync(customer)
        await self._drive(self.core.set_entitlement(customer, plan, anchor, timezone))

    async def put_customer(self, customer: str, spec: CustomerConfig | Mapping[str, Any]) -> None:
        """Create or replace a customer; missing balances are created, existing ones kept."""
        await self.sync(customer)
        spec = _validated(CustomerConfig, spec, "customer")
        await self._drive(self.core.put_customer(customer, spec))

    async def create_balance(
        self, customer: str, name: str, spec: BalanceConfig | Mapping[str, Any]
    ) -> BalanceState:
        """Create a balance (its amount is written once) or update an existing one's settings."""
        await self.sync(customer)
        spec = _validated(BalanceConfig, spec, "balance")
        return await self._drive(self.core.create_balance(customer, name, spec))

    async def balance(self, customer: str, name: str) -> BalanceState:
        """Return a balance: amount, held, available, overage, unit, suspended."""
        await self.sync(customer)
        return await self._drive(self.core.balance_op(customer, name, "read"))

    async def topup(
        self, customer: str, name: str, amount: int, idempotency_key: str | None = None
    ) -> BalanceState:
        """Add credit to a balance, once per idempotency key."""
        await self.sync(customer)
        return await self._drive(
            self.core.balance_op(customer, name, "topup", amount, idempotency_key)
        )

    async def withdraw(
        self, customer: str, name: str, amount: int, idempotency_key: str | None = None
    ) -> BalanceState:
        """Take credit out of a balance, never below 0 available (raises Conflict otherwise)."""
        await self.sync(customer)
        return await self._drive(
            self.core.balance_op(customer, name, "withdraw", amount, idempotency_key)
        )

    async def suspend_balance(self, customer: str, name: str) -> BalanceState:
        """Suspend a balance: admissions charging it are refused with 403."""
        await self.sync(customer)
        return await self._drive(self.core.balance_op(customer, name, "suspend"))

    async def resume_balance(self, customer: str, name: str) -> BalanceState:
        """Resume a suspended balance."""
        await self.sync(customer)
        return await self._drive(self.core.balance_op(customer, name, "resume"))

    async def reserve(
        self,
        customer: str,
        name: str,
        amount: int,
        ttl_s: int,
        idempotency_key: str | None = None,
    ) -> str:
        """Hold `amount` on a balance for `ttl_s` seconds and return the reservation id (once per
        idempotency key)."""
        await self.sync(customer)
        return (
            await self._drive(self.core.reserve(customer, name, amount, ttl_s, idempotency_key))
        )[0]

    async def cancel_reservation(self, customer: str, name: str, idempotency_key: str) -> str:
        """Undo a keyed reservation whose reply was lost: release its hold, or void it if it has
        not arrived yet ('voided', 'released' or 'closed')."""
        return await self._drive(self.core.cancel_reservation(customer, name, idempotency_key))

    async def commit(
        self, reservation_id: str, amount: int, idempotency_key: str | None = None
    ) -> BalanceState:
        """Charge the actual amount of a reservation and release the rest (once)."""
        return await self._drive(
            self.core.close_reservation(reservation_id, "commit", amount, idempotency_key)
        )

    async def release(
        self, reservation_id: str, idempotency_key: str | None = None
    ) -> BalanceState:
        """Release a reservation's hold (once)."""
        return await self._drive(
            self.core.close_reservation(reservation_id, "release", 0, idempotency_key)
        )

    async def ledger(self, customer: str, limit: int = 100) -> list[dict[str, Any]]:
        """Return the customer's balance mutations, newest first."""
        await self.sync(customer)
        return await self._drive(self.core.ledger(customer, limit))

    async def customer_for_key(self, api_key: str) -> str | None:
        """Return the customer holding an API key, or None."""
        return await self._drive(self.core.customer_for_key(api_key))

    async def add_api_key(self, customer: str, api_key: str) -> str:
        """Store the hash of a new API key for a customer and return the hash."""
        return await self._drive(self.core.add_api_key(customer, api_key))

    async def aclose(self) -> None:
        """Settle every allowance, then close the storage connections; later calls raise
        StorageUnavailable until `reopen`."""
        if self.book is not None and len(self.book) and not self._closed:
            try:
                await self.sync()
            except Exception:  # the holds expire on their own: nothing unadmitted is charged
                logger.exception("metergate: settling allowances at shutdown failed")
        flusher, self._flusher = self._flusher, None
        if flusher is not None and not flusher.done():
            flusher.cancel()
        self._closed = True
        task, self._starting = self._starting, None
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                await asyncio.wait([task])  # unlike `await task`, keeps our own cancellation
        await self.storage.aclose()

    def reopen(self) -> None:
        """Accept calls again after `aclose` (an app whose lifespan starts again, as a test client's
        does on every `with` block); connections open on the next call."""
        self._closed = False

    async def __aenter__(self) -> AsyncMeter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _settle_at_exit(ref: weakref.ref[Meter]) -> None:
    meter = ref()
    if meter is not None and not meter._stopping.is_set():
        try:
            meter.sync()
        except Exception:  # the holds expire on their own: nothing unadmitted is charged
            logger.exception("metergate: settling allowances at exit failed")


def _lease_ms(seconds: int | None, ms: int | None) -> int | None:
    """A lease lifetime in milliseconds, from whichever unit was given (None: the default)."""
    if ms is not None:
        return ms
    return seconds * 1000 if seconds else None
