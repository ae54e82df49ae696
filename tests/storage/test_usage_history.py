"""The dashboard's usage history: units per hour and per day, written once per reported window, trimmed."""

from __future__ import annotations

from typing import Any

from tests.builders import asset, customer, gateway, metric, plan, tier
from tests.worker.conftest import run

from conftest import Clock, with_storage
from metergate import Meter
from metergate.core.flows import Command
from metergate.core.history import DAY_MS, HOUR_MS, history_keys, usage_series
from metergate.core.keys import Keys
from metergate.storage import AsyncStorage
from metergate.worker.keys import WorkerKeys
from metergate.worker.reports import UsageReporter

CONFIG: dict[str, Any] = gateway(
    metrics={"calls": metric(), "seats": metric("Gauge")},
    plans={
        "daily": plan(calls=asset(tier(0), period="day"), seats=asset(tier(0))),
        "monthly": plan(calls=asset(tier(0), period="month")),
    },
    customers={"d": customer("daily"), "m": customer("monthly")},
    storage={"partitions": 4},
    usage_report_interval="60s",
)
KEYS = WorkerKeys(Keys("mg", 4))


def report(storage_url: str, now_ms: int) -> None:
    """Report every due usage window of every partition, as the worker does."""

    async def scenario(storage: AsyncStorage) -> None:
        reporter = UsageReporter(storage, KEYS, 60_000)
        for partition in range(4):
            while await reporter.run(partition, now_ms):
                pass

    run(scenario, storage_url)


def buckets(meter: Meter, customer: str) -> tuple[dict[str, str], dict[str, str]]:
    """The hourly and daily history hashes of a customer's `calls`, as stored."""
    hourly, daily = history_keys(meter.core.keys, customer, "calls")
    return (
        meter.storage.run(Command(("HGETALL", hourly))),
        meter.storage.run(Command(("HGETALL", daily))),
    )


def meter_on(storage_url: str, clock: Clock) -> Meter:
    config = with_storage(CONFIG, storage_url)
    config["storage"]["partitions"] = 4
    return Meter(config, clock=clock)


def test_reported_windows_add_up_per_hour_and_day_once(storage_url: str, clock: Clock) -> None:
    """Each reported window's units land in its hour and day once; open windows count before that."""
    meter = meter_on(storage_url, clock)
    hour0 = int(clock.now * 1000) // HOUR_MS
    for units in (3, 4, 5):
        meter.record("d", "calls", units)
        clock.advance(1800)  # two records in the first hour, one in the next
    series = meter.run(usage_series(meter.core, "d", "calls"))
    assert series is not None and series.bucket_ms == HOUR_MS
    assert series.units == {hour0 * HOUR_MS: 7, (hour0 + 1) * HOUR_MS: 5}  # from open windows
    report(storage_url, int(clock.now * 1000))
    report(storage_url, int(clock.now * 1000))  # a second pass reports nothing again
    hourly, daily = buckets(meter, "d")
    assert {k: v for k, v in hourly.items() if k != "lo"} == {str(hour0): "7", str(hour0 + 1): "5"}
    assert sum(int(v) for k, v in daily.items() if k != "lo") == 12
    after = meter.run(usage_series(meter.core, "d", "calls"))
    assert after is not None and after.units == series.units
    assert after.cumulative(*after.current)[-1][1] == meter.usage("d", "calls")["value"] == 12
    meter.close()


def test_history_keeps_the_last_buckets_and_forgets_the_rest(
    storage_url: str, clock: Clock
) -> None:
    """After 70 days of daily usage, 62 days and 48 hours remain; the series shows two periods."""
    meter = meter_on(storage_url, clock)
    for _day in range(70):
        meter.record("m", "calls", 2)
        clock.advance(120)
        report(storage_url, int(clock.now * 1000))
        clock.advance(DAY_MS / 1000 - 120)
    hourly, daily = buckets(meter, "m")
    kept = sorted(int(k) for k in daily if k != "lo")
    last = (int(clock.now * 1000) - DAY_MS) // DAY_MS
    assert kept == list(range(last - 61, last + 1))
    assert len([k for k in hourly if k != "lo"]) <= 48
    series = meter.run(usage_series(meter.core, "m", "calls"))
    assert series is not None and series.bucket_ms == DAY_MS
    previous = series.cumulative(*series.previous)
    assert previous[-1][1] == 2 * len(previous)  # a whole month, two units a day
    meter.close()


def test_a_long_pause_starts_the_history_afresh(storage_url: str, clock: Clock) -> None:
    """Usage after more than the kept days of silence leaves only the new bucket."""
    meter = meter_on(storage_url, clock)
    meter.record("m", "calls", 1)
    clock.advance(120)
    report(storage_url, int(clock.now * 1000))
    clock.advance(200 * 86_400)
    meter.record("m", "calls", 6)
    clock.advance(120)
    report(storage_url, int(clock.now * 1000))
    _, daily = buckets(meter, "m")
    assert [v for k, v in daily.items() if k != "lo"] == ["6"]
    meter.close()


def test_assets_without_a_period_have_no_series(storage_url: str, clock: Clock) -> None:
    """A Gauge has no usage to add up over a period: its series is None."""
    meter = meter_on(storage_url, clock)
    meter.record("d", "seats", 4)
    assert meter.run(usage_series(meter.core, "d", "seats")) is None
    meter.close()
