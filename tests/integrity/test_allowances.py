"""Local allowances keep every limit exact: across processes, through kills, refunds and shutdown.

Each process here is a real OS process with its own `Meter` and allowance book, over one real
redis-server or Redis Cluster, as gateway workers would be.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from tests.builders import asset, counters, customer, gateway, plan, tier

from conftest import with_storage
from metergate import AsyncMeter, Meter

LIMIT = 300
CUSTOMER = "acme"


def _config(url: str, *, limit: int = LIMIT, credits: int = 1_000_000, **allowances: Any) -> dict:
    """One metric with a Deny tier at `limit`, priced 1 credit a unit from a prepaid balance."""
    calls = asset(
        tier(0, per_unit=1), tier(limit, "OverUsage", "Deny"), period="month", balance="credits"
    )
    config = gateway(
        metrics=counters("calls", unit="requests"),
        plans={"pro": plan(calls=calls)},
        customers={CUSTOMER: customer("pro", credits=credits)},
        allowances={"enabled": True, "flush_ms": 50, "ttl": "1s", **allowances},
    )
    return with_storage(config, url)


def _hammer(config: dict, start: Any, out: Any) -> None:
    """Admit as fast as possible until every request of the last half second was refused."""
    meter = Meter(config)
    admitted = 0
    start.wait()
    refused_since: float | None = None
    while True:
        decision = meter.admit_request(CUSTOMER, {"calls": 1})
        if decision.allowed:
            admitted += 1
            refused_since = None
            assert decision.ticket is not None
            meter.settle(decision.ticket)
        else:
            assert decision.status in (402, 429), decision
            now = time.monotonic()
            refused_since = refused_since or now
            if now - refused_since > 0.5:
                break
    meter.close()
    out.put(admitted)


@pytest.mark.parametrize("bound", ["quota", "balance"])
def test_four_processes_admit_exactly_the_limit(shared_storage: str, bound: str) -> None:
    """Four processes hammering one Deny limit (or one balance) admit exactly it, no more, no
    less: allowances never pass the boundary, and every unit they held comes back."""
    if bound == "quota":
        config = _config(shared_storage)
    else:
        config = _config(shared_storage, limit=10 * LIMIT, credits=LIMIT)
    Meter(config).close()  # the customer is created once, before the race
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_hammer, args=(config, start, out)) for _ in range(4)]
    for worker in workers:
        worker.start()
    start.set()
    counts = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert sum(counts) == LIMIT, counts
    with Meter({**config, "allowances": {"enabled": False}}) as meter:
        usage = meter.usage(CUSTOMER, "calls")
        balance = meter.balance(CUSTOMER, "credits")
    assert usage["value"] == LIMIT and usage["pending"] == 0
    assert balance.held == 0
    assert balance.amount == (1_000_000 if bound == "quota" else LIMIT) - LIMIT


KILLED = textwrap.dedent(
    """
    import json, sys, time
    from metergate import Meter
    meter = Meter(json.loads(sys.argv[1]))
    first = meter.admit_request("acme", {"calls": 1})  # a period's first request: per request
    meter.settle(first.ticket)
    given = 0
    for _ in range(5):
        decision = meter.admit_request("acme", {"calls": 1})
        assert decision.allowed and decision.ticket.allowance is not None
        meter.settle(decision.ticket)
        given += 1
    print(given, flush=True)
    time.sleep(600)
    """
)


def test_a_killed_process_never_charges_what_it_did_not_settle(shared_storage: str) -> None:
    """SIGKILL between flushes: the units given since the last flush are never charged (the
    customer's favour), and the allowance's hold returns to the quota and balance after `ttl`."""
    import json

    config = _config(shared_storage, flush_ms=600_000)  # no flush before the kill
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, json.dumps(config)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"5"
        with Meter({**config, "allowances": {"enabled": False}}) as meter:
            held = meter.balance(CUSTOMER, "credits").held
            assert held > 0  # the allowance is held while its process lives
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            time.sleep(1.2)  # the allowance's ttl
            assert meter.admit(CUSTOMER, {"calls": 1}).allowed  # expires what is due
            usage = meter.usage(CUSTOMER, "calls")
            balance = meter.balance(CUSTOMER, "credits")
        assert usage["value"] == 2 and usage["pending"] == 0  # the two per-request admissions
        assert balance.held == 0 and balance.amount == 1_000_000 - 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_shutdown_settles_what_was_given(shared_storage: str) -> None:
    """Closing a meter settles its allowances: every request given is counted and charged, and
    what was not given returns at once."""
    config = _config(shared_storage, flush_ms=600_000)
    meter = Meter(config)
    for _ in range(7):
        decision = meter.admit_request(CUSTOMER, {"calls": 1})
        assert decision.allowed and decision.ticket is not None
        meter.settle(decision.ticket)
    assert meter.book is not None and len(meter.book) == 1
    meter.close()
    with Meter({**config, "allowances": {"enabled": False}}) as reader:
        assert reader.usage(CUSTOMER, "calls")["value"] == 7
        assert reader.usage(CUSTOMER, "calls")["pending"] == 0
        balance = reader.balance(CUSTOMER, "credits")
    assert balance.held == 0 and balance.amount == 1_000_000 - 7


def test_a_refunded_request_from_an_allowance_is_never_charged(shared_storage: str) -> None:
    """A request given in process and then refunded (its response was a 5xx) goes back to the
    allowance: the settlement counts only the others."""
    asyncio.run(_refunded(_config(shared_storage, flush_ms=600_000)))


async def _refunded(config: dict[str, Any]) -> None:
    async with AsyncMeter(config) as meter:
        tickets = []
        for _ in range(6):
            decision = await meter.admit_request(CUSTOMER, {"calls": 1})
            assert decision.allowed and decision.ticket is not None
            tickets.append(decision.ticket)
        assert tickets[-1].allowance is not None
        for ticket in tickets[:-2]:
            await meter.settle(ticket)
        for ticket in tickets[-2:]:
            assert await meter.refund_ticket(ticket) == "refunded"
        # a read through the same meter settles the customer's allowances first
        assert (await meter.usage(CUSTOMER, "calls"))["value"] == 4
        balance = await meter.balance(CUSTOMER, "credits")
        assert balance.held == 0 and balance.amount == 1_000_000 - 4


def test_the_headers_of_a_request_from_an_allowance_are_a_per_request_admissions(
    shared_storage: str,
) -> None:
    """Remaining and balance count down one request at a time, as storage would say."""
    config = _config(shared_storage, flush_ms=600_000)
    with Meter(config) as meter:
        seen = []
        for _ in range(6):
            decision = meter.admit_request(CUSTOMER, {"calls": 1})
            seen.append((decision.assets["calls"].remaining, decision.balances["credits"]))
            assert decision.ticket is not None
            meter.settle(decision.ticket)
        assert seen == [(LIMIT - i, 1_000_000 - i) for i in range(1, 7)]


EXITS = textwrap.dedent(
    """
    import json, sys
    from metergate import Meter
    meter = Meter(json.loads(sys.argv[1]))
    for _ in range(7):
        decision = meter.admit_request("acme", {"calls": 1})
        assert decision.allowed
        meter.settle(decision.ticket)
    assert len(meter.book) == 1  # one allowance open, nothing settled: then the process exits
    """
)


def test_a_process_that_exits_without_closing_settles_at_exit(shared_storage: str) -> None:
    """A WSGI worker recycled by its server never closes its Meter: what it gave is settled at
    interpreter exit all the same."""
    import json

    config = _config(shared_storage, flush_ms=600_000)
    subprocess.run(
        [sys.executable, "-c", EXITS, json.dumps(config)],
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    with Meter({**config, "allowances": {"enabled": False}}) as reader:
        usage = reader.usage(CUSTOMER, "calls")
        balance = reader.balance(CUSTOMER, "credits")
    assert usage["value"] == 7 and usage["pending"] == 0
    assert balance.held == 0 and balance.amount == 1_000_000 - 7
