"""The money audit: several client processes through `metergate serve` and admin reservations at
once, while Redis is paused and then killed and restarted; afterwards the books balance."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import RedisProcess

from .conftest import PRICE, Upstream, admin, auth, books, gateway_config, paused, serve

pytestmark = pytest.mark.redis

CUSTOMERS = ("c0", "c1", "c2")
START = 1_000_000
HOLD, COMMIT = 5, 3


def client(proxy: str, customer: str, until: float) -> dict[int, int]:
    """Send requests until `until` (epoch s) as one customer (a process of its own); count the
    answers."""
    counts: Counter[int] = Counter()
    deadline = time.monotonic() + until - time.time()
    with httpx.Client(base_url=proxy, headers=auth(customer), timeout=10) as http:
        while time.monotonic() < deadline:
            try:
                counts[http.get("/v1/work").status_code] += 1
            except httpx.HTTPError:
                counts[0] += 1  # no answer: a request the gateway never answered is never counted
    return dict(counts)


def reservations(served: Any, stop: threading.Event, committed: Counter[str]) -> None:
    """Reserve and commit on each customer's balance, retrying each step with its key until it
    gets a definite answer (what the README tells clients to do)."""
    n = 0
    while not stop.is_set():
        customer = CUSTOMERS[n % len(CUSTOMERS)]
        n += 1
        key = {"idempotency-key": f"audit-{n}"}
        rid = None
        while rid is None:
            try:
                r = admin(
                    served,
                    "POST",
                    f"/v1/customers/{customer}/balances/credits/reservations",
                    json={"amount": HOLD, "ttl_s": 600},
                    headers=key,
                )
            except httpx.HTTPError:
                continue
            if r.status_code == 201:
                rid = r.json()["id"]
            elif r.status_code != 503:
                raise AssertionError(r.text + served.log.read_text()[-20000:])
        key = {"idempotency-key": f"audit-commit-{n}"}
        while True:
            try:
                r = admin(
                    served,
                    "POST",
                    f"/v1/reservations/{rid}/commit",
                    json={"amount": COMMIT},
                    headers=key,
                )
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                committed[customer] += COMMIT
                break
            if r.status_code != 503:
                raise AssertionError(r.text + served.log.read_text()[-20000:])


def test_money_audit_under_pause_and_kill(
    tmp_path: Path, upstream: tuple[str, Upstream], aof_redis: RedisProcess
) -> None:
    """For every customer, credits drawn == requests served x price (+ reservations committed),
    and amount == the sum of the ledger, after Redis was paused and killed under load, except the
    admissions counted in metergate_admissions_unknown_total."""
    url, _ = upstream
    config = gateway_config(url, aof_redis.url, dict.fromkeys(CUSTOMERS, START), timeout_ms=100)
    with serve(tmp_path, config) as gw:
        for customer in CUSTOMERS:  # warm the key cache and the connections: one served each
            while httpx.get(f"{gw.proxy}/v1/work", headers=auth(customer)).status_code != 200:
                time.sleep(0.1)
        seconds = 9.0
        stop = threading.Event()
        committed: Counter[str] = Counter()
        reserver = threading.Thread(target=reservations, args=(gw, stop, committed))
        with multiprocessing.get_context("spawn").Pool(len(CUSTOMERS)) as pool:
            # the processes start now; they send until the faults are over
            pool.map(time.sleep, [0.01] * len(CUSTOMERS))
            until = time.time() + seconds
            pending = [pool.apply_async(client, (gw.proxy, c, until)) for c in CUSTOMERS]
            reserver.start()
            time.sleep(2)
            with paused(aof_redis):
                time.sleep(1.5)
            time.sleep(2)
            aof_redis.stop()  # SIGKILL
            time.sleep(0.5)
            aof_redis.start()  # same port and directory: the AOF brings the data back
            counts = [p.get(timeout=120) for p in pending]
        stop.set()
        reserver.join(120)
        assert not reserver.is_alive()

        # the recovery queue drains by itself; wait until it has
        expected: dict[str, tuple[int, int, int, int]] = {}
        for customer, answers in zip(CUSTOMERS, counts, strict=True):
            served = answers.get(200, 0) + 1  # the warm-up request
            amount = START - served * PRICE - committed[customer]
            expected[customer] = (served, amount, 0, amount)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if all(books(gw, c) == expected[c] for c in CUSTOMERS):
                    break
            except (httpx.HTTPError, AssertionError, KeyError):
                pass
            time.sleep(0.5)
        unknown = gw.unknown()
        actual = {c: books(gw, c) for c in CUSTOMERS}
        totals: Counter[int] = Counter()
        for answers in counts:
            totals.update(answers)
        redis = aof_redis.client()
        records = [redis.get(k) for k in redis.scan_iter("*:op:*:u:*", count=1000)]
        refunds = sum(
            1
            for c in CUSTOMERS
            for e in admin(gw, "GET", f"/v1/customers/{c}/ledger?limit=10000").json()["entries"]
            if e["kind"] == "refund"
        )
        figures = {
            "served": sum(v[0] for v in expected.values()),
            "refused": sum(n for status, n in totals.items() if status != 200),
            "answers": {str(k): v for k, v in sorted(totals.items())},
            "charged": sum(v[0] for v in actual.values()),
            "credits_drawn": sum(START - v[1] for v in actual.values()),
            "reservations_committed": sum(committed.values()),
            "unknown": unknown,
            "late_admissions_refunded": refunds,
            "late_admissions_voided": records.count("void"),
        }
        (tmp_path / "audit.json").write_text(json.dumps(figures, indent=2) + "\n")
        print("money audit:", json.dumps(figures))
        assert totals[503] > 0, figures  # the faults did refuse requests
        for customer in CUSTOMERS:
            served, amount, held, ledger = actual[customer]
            assert held == 0
            assert amount == ledger, (customer, actual[customer])
            drift = expected[customer][0] - served
            assert 0 <= -drift <= unknown, (customer, actual[customer], expected[customer], figures)
            assert START - amount == served * PRICE + committed[customer], figures
