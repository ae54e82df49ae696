"""The recovery queue: refunds and deferred requests run by themselves, and what cannot is counted."""

from __future__ import annotations

import asyncio
from typing import Any

from metergate.core.errors import StorageUnavailable
from metergate.core.http import Deferred
from metergate.observability import ADMISSIONS_UNKNOWN
from metergate.recovery import Recovery


class FakeMeter:
    """Stands in for an AsyncMeter whose storage is down until `up` is set."""

    def __init__(self) -> None:
        self.up = False
        self.calls: list[tuple[str, Any]] = []

    async def refund(self, customer: str, attempt: str, operation: str = "") -> str:
        if not self.up:
            raise StorageUnavailable("down")
        self.calls.append(("refund", attempt))
        return "refunded"

    async def admit(self, customer: str, amounts: Any, key: Any = None, **kw: Any) -> Any:
        if not self.up:
            raise StorageUnavailable("down")
        self.calls.append(("admit", kw.get("attempt")))

        class Allowed:
            allowed = True
            problem = None

        return Allowed()


def unknown() -> float:
    """The current value of metergate_admissions_unknown_total."""
    return ADMISSIONS_UNKNOWN._value.get()


def test_queued_work_runs_by_itself_once_storage_answers() -> None:
    """A refund and a deferred request queued while storage is down run, in order, once it is back,
    with no new request to start them."""

    async def scenario() -> list[tuple[str, Any]]:
        meter = FakeMeter()
        recovery = Recovery(meter)  # type: ignore[arg-type]
        recovery.refund("c", "a1")
        recovery.record(Deferred("c", None, {"calls": 1}, "degraded-1", "a2"))
        await asyncio.sleep(0.2)
        assert len(recovery) == 2
        meter.up = True
        while len(recovery):
            await asyncio.sleep(0.05)
        await recovery.close(1.0)
        return meter.calls

    assert asyncio.run(scenario()) == [("refund", "a1"), ("admit", "a2")]


def test_refunds_left_at_shutdown_or_dropped_are_counted_unknown() -> None:
    """A refund dropped from a full buffer, and one still queued at shutdown, each count once in
    metergate_admissions_unknown_total."""

    async def scenario() -> None:
        recovery = Recovery(FakeMeter(), size=1)  # type: ignore[arg-type]
        recovery.refund("c", "a1")
        recovery.refund("c", "a2")  # drops a1
        await recovery.close(0.1)

    before = unknown()
    asyncio.run(scenario())
    assert unknown() - before == 2
