"""Upstream connections shared fairly: at most N at once per customer (or per client address).

The upstream pool is shared by everyone; a customer who opens a thousand slow uploads would hold
every connection of it, and the others would wait. Each customer gets its own cap, below the
pool's size: its requests past the cap wait for one of its own connections (within the proxy's
timeout), never for another customer's.
"""

from __future__ import annotations

import asyncio

__all__ = ["CustomerSlots"]


class _Slot:
    __slots__ = ("held", "semaphore", "users")

    def __init__(self, size: int) -> None:
        self.semaphore = asyncio.Semaphore(size)
        self.users = 0  # holding or waiting
        self.held = 0


class CustomerSlots:
    """Per-customer semaphores, created on first use and dropped when nobody holds or waits."""

    def __init__(self, per_customer: int) -> None:
        self.per_customer = per_customer
        self._slots: dict[str, _Slot] = {}

    async def acquire(self, who: str, timeout_s: float) -> bool:
        """Take one of `who`'s slots, waiting at most `timeout_s`; return False on timeout."""
        slot = self._slots.get(who)
        if slot is None:
            slot = self._slots[who] = _Slot(self.per_customer)
        slot.users += 1
        try:
            if slot.semaphore.locked():
                await asyncio.wait_for(slot.semaphore.acquire(), timeout_s)
            else:
                await slot.semaphore.acquire()  # a free slot: no wait, no timer
        except TimeoutError:
            self._leave(who, slot)
            return False
        except BaseException:
            self._leave(who, slot)
            raise
        slot.held += 1
        return True

    def release(self, who: str) -> None:
        """Give back a slot taken by `acquire`."""
        slot = self._slots.get(who)
        if slot is not None:
            slot.held -= 1
            slot.semaphore.release()
            self._leave(who, slot)

    def held(self, who: str) -> int:
        """How many of `who`'s slots are taken right now."""
        slot = self._slots.get(who)
        return 0 if slot is None else slot.held

    def _leave(self, who: str, slot: _Slot) -> None:
        slot.users -= 1
        if slot.users == 0:
            del self._slots[who]
