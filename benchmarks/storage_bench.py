"""Storage benchmarks: Redis CPU per admission, the embedded backend's rate, memory per customer.

These drive metergate's core directly (no HTTP). Redis CPU is read two ways: `INFO commandstats`
(`usec_per_call` of EVALSHA, the time Redis spends inside the script, wall clock) and the
redis-server process's CPU time per admission (script plus protocol and socket work).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterable
from typing import Any

import redis
import scenario
from harness import cpu_seconds

from metergate import AsyncMeter, Meter, parse_config
from metergate.config import CustomerConfig
from metergate.core.flows import Flow, MeterCore, Script
from metergate.storage.pipelined import PipelinedConnection
from metergate.storage.scripts import SCRIPT_NAMES, load_script

CONCURRENCY = 16


def reseed(client: redis.Redis, config: dict[str, Any]) -> None:
    """Empty Redis and load the config's customers again (same entitlement version as before)."""
    client.flushall()
    with Meter(config) as meter:  # its first call loads every configured customer
        meter.balance(next(iter(config["customers"])), "credits")


Snapshot = list[tuple[bytes, int, bytes]]


def snapshot(url: str) -> Snapshot:
    """Return every key of Redis as (name, milliseconds to live or 0, DUMP payload)."""
    raw = redis.Redis.from_url(url)  # DUMP payloads are bytes
    names = list(raw.scan_iter(count=5000))
    pipe = raw.pipeline(transaction=False)
    for name in names:
        pipe.pttl(name)
        pipe.dump(name)
    replies = pipe.execute()
    raw.close()
    return [
        (n, max(0, ttl), payload)
        for n, ttl, payload in zip(names, replies[::2], replies[1::2], strict=True)
    ]


def restore(client: redis.Redis, keys: Snapshot) -> None:
    """Empty Redis and write a snapshot back: many customers reseeded in a fraction of the time."""
    client.flushall()
    pipe = client.pipeline(transaction=False)
    for name, ttl, payload in keys:
        pipe.restore(name, ttl, payload)
    pipe.execute()


def _commandstats(client: redis.Redis) -> dict[str, dict[str, float]]:
    return client.info("commandstats")  # type: ignore[no-any-return]


async def _admissions(meter: AsyncMeter, amounts: dict[str, int], count: int) -> None:
    async def worker(n: int) -> None:
        for _ in range(n):
            decision = await meter.admit(scenario.CUSTOMER, amounts)
            if not decision.allowed:
                raise RuntimeError(f"admission refused: {decision.problem}")

    share = [count // CONCURRENCY + (i < count % CONCURRENCY) for i in range(CONCURRENCY)]
    await asyncio.gather(*(worker(n) for n in share))


async def _incrs(url: str, count: int) -> None:
    conn = PipelinedConnection(url)

    async def worker(n: int) -> None:
        for _ in range(n):
            await conn.call("INCR", "bench:incr")

    share = [count // CONCURRENCY + (i < count % CONCURRENCY) for i in range(CONCURRENCY)]
    await asyncio.gather(*(worker(n) for n in share))
    await conn.aclose()


async def _timed_admissions(
    config: dict[str, Any], amounts: dict[str, int], count: int, client: redis.Redis, pid: int
) -> float:
    """Run `count` admissions after a warm-up; return redis-server CPU seconds they took."""
    meter = AsyncMeter(config)
    try:
        await _admissions(meter, amounts, 50)  # connect, load the script, cache the entitlement
        client.config_resetstat()
        cpu0 = cpu_seconds(pid)
        await _admissions(meter, amounts, count)
        return cpu_seconds(pid) - cpu0
    finally:
        await meter.aclose()


def _script_stats(client: redis.Redis, command: str, count: int, cpu: float) -> dict[str, float]:
    """Read the commandstats of `count` calls of `command` (since CONFIG RESETSTAT)."""
    stats = _commandstats(client)
    inner = sum(
        s["calls"]
        for name, s in stats.items()
        if name != f"cmdstat_{command}" and not name.startswith("cmdstat_config")
    )
    return {
        "usec_per_call": float(stats[f"cmdstat_{command}"]["usec_per_call"]),
        "redis_cpu_us": cpu / count * 1e6,
        "inner_commands": inner / count,
    }


def redis_cpu(
    url: str, pid: int, *, rounds: int, count: int, assets: Iterable[int], tiers: Iterable[int]
) -> dict[str, Any]:
    """Measure Redis time per admission for each (assets, tiers) and per INCR, interleaved."""
    client = redis.Redis.from_url(url, decode_responses=True)
    grid = [(a, t) for a in assets for t in tiers]
    incr_count = max(20_000, count * 10)  # enough CPU to register on a 10 ms clock tick
    samples: dict[str, list[dict[str, float]]] = {"incr": []}
    for a, t in grid:
        samples[f"{a}x{t}"] = []
    for r in range(rounds):
        order = grid[r % len(grid) :] + grid[: r % len(grid)]
        for a, t in order:
            config = scenario.gateway_config(url, assets=a, tier_count=t)
            reseed(client, config)
            amounts = dict.fromkeys(scenario.metric_names(a), 1)

            cpu = asyncio.run(_timed_admissions(config, amounts, count, client, pid))
            samples[f"{a}x{t}"].append(_script_stats(client, "evalsha", count, cpu))
        client.flushall()
        client.config_resetstat()
        cpu0 = cpu_seconds(pid)
        asyncio.run(_incrs(url, incr_count))
        samples["incr"].append(_script_stats(client, "incr", incr_count, cpu_seconds(pid) - cpu0))
    client.close()

    def summary(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}

    out: dict[str, Any] = {
        "count_per_round": count,
        "rounds": rounds,
        "incr": summary(samples["incr"]),
    }
    out["grid"] = [{"assets": a, "tiers": t, **summary(samples[f"{a}x{t}"])} for a, t in grid]
    out["samples"] = samples
    return out


def embedded(*, rounds: int, seconds: float) -> dict[str, Any]:
    """Admissions per second of the embedded backend (memory://, in-process keyspace + lupa), one thread."""
    rates_sync: list[float] = []
    rates_async: list[float] = []
    for r in range(rounds):
        config = scenario.gateway_config(f"memory://bench-{r}")
        with Meter(config) as meter:
            meter.admit(scenario.CUSTOMER, {"api_calls": 1})
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                meter.admit(scenario.CUSTOMER, {"api_calls": 1})
                n += 1
            rates_sync.append(n / (time.perf_counter() - t0))

        async def run_async(config: dict[str, Any] = config) -> float:
            meter = AsyncMeter(config)
            await meter.admit(scenario.CUSTOMER, {"api_calls": 1})
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                await meter.admit(scenario.CUSTOMER, {"api_calls": 1})
                n += 1
            rate = n / (time.perf_counter() - t0)
            await meter.aclose()
            return rate

        rates_async.append(asyncio.run(run_async()))
    return {
        "sync_admissions_per_s": round(statistics.median(rates_sync)),
        "async_admissions_per_s": round(statistics.median(rates_async)),
        "samples_sync": [round(x) for x in rates_sync],
        "samples_async": [round(x) for x in rates_async],
    }


def drive(client: redis.Redis, flows: list[Flow[Any]], batch: int = 2000) -> list[Any]:
    """Run many sans-I/O flows in lockstep, each step of a batch in one pipeline; return results."""
    shas = {name: load_script(name).sha for name in SCRIPT_NAMES}
    results: list[Any] = [None] * len(flows)
    for start in range(0, len(flows), batch):
        pending: list[tuple[int, Flow[Any], Any]] = []
        for i in range(start, min(start + batch, len(flows))):
            try:
                pending.append((i, flows[i], next(flows[i])))
            except StopIteration as stop:
                results[i] = stop.value
        while pending:
            pipe = client.pipeline(transaction=False)
            for _, _, call in pending:
                if isinstance(call, Script):
                    pipe.evalsha(shas[call.name], len(call.keys), *call.keys, *call.args)
                else:
                    for args in _commands(call):
                        pipe.execute_command(*args)
            replies = iter(pipe.execute())
            following = []
            for i, flow, call in pending:
                if isinstance(call, Script) or not hasattr(call, "commands"):
                    reply = next(replies)
                else:  # a Batch: its replies, in order, as a list
                    reply = [next(replies) for _ in call.commands]
                try:
                    following.append((i, flow, flow.send(reply)))
                except StopIteration as stop:
                    results[i] = stop.value
            pending = following
    return results


def _commands(call: Any) -> tuple[tuple[str, ...], ...]:
    """The commands of a Command, or of a Batch (plain commands pipelined together)."""
    commands = getattr(call, "commands", None)
    return commands if commands is not None else (call.args,)


def _used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _drop_operation_records(client: redis.Redis) -> int:
    """Delete the idempotency records (they expire: 10 min for admissions, 24 h when keyed)."""
    dropped = 0
    batch: list[str] = []
    for key in client.scan_iter(match="*:op:*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            dropped += client.unlink(*batch)
            batch = []
    if batch:
        dropped += client.unlink(*batch)
    return dropped


def memory(url: str, *, customers: int) -> dict[str, Any]:
    """Redis memory per customer and per customer asset, from INFO memory before and after."""
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushall()
    for name in SCRIPT_NAMES:
        client.script_load(load_script(name).source)
    config = parse_config(scenario.gateway_config(url))
    core = MeterCore(config, time.time)
    drive(client, [core.bootstrap()])
    ids = [f"cust{i:06d}" for i in range(customers)]
    spec = CustomerConfig.model_validate(
        {
            "entitlement": {"plan": "bench"},
            "balances": {"credits": {"amount": scenario.CREDITS}},
        }
    )
    m0 = _used(client)
    t0 = time.perf_counter()
    drive(client, [_with_key(core, cid, spec) for cid in ids])
    m1 = _used(client)
    creation_ops = _drop_operation_records(client)
    m1b = _used(client)
    decisions = drive(client, [core.admit(cid, {"api_calls": 1}) for cid in ids])
    refused = sum(1 for d in decisions if not d.allowed)
    m2 = _used(client)
    admission_ops = _drop_operation_records(client)
    m3 = _used(client)
    elapsed = time.perf_counter() - t0

    sample = ids[0]
    asset_key, _ = core.keys.asset(sample, "api_calls")
    balance_key, _ = core.keys.balance(sample, "credits")
    ledger_key = core.keys.ledger(sample)
    breakdown = {
        "customer_hash": client.memory_usage(core.keys.customer(sample)),
        "balance_hash": client.memory_usage(balance_key),
        "asset_hash": client.memory_usage(asset_key),
        "ledger_list_2_entries": client.memory_usage(ledger_key),
    }
    # The ledger gains one JSON entry per priced admission, up to 10,000 per customer.
    one = MeterCore(config, time.time)
    drive(client, [one.admit(sample, {"api_calls": 1}) for _ in range(998)], batch=1)
    breakdown["ledger_list_1000_entries"] = client.memory_usage(ledger_key)
    sample_op = next(iter(client.scan_iter(match="*:op:*", count=1000)), None)
    breakdown["operation_record"] = client.memory_usage(sample_op) if sample_op else None
    client.flushall()
    client.close()
    per_entry = (breakdown["ledger_list_1000_entries"] - breakdown["ledger_list_2_entries"]) / 998
    return {
        "customers": customers,
        "seconds": round(elapsed, 1),
        "refused": refused,
        "used_memory": {"empty": m0, "customers": m1, "customers_no_ops": m1b},
        "used_memory_after_admission": {"with_ops": m2, "no_ops": m3},
        "operation_records_dropped": {"creation": creation_ops, "admission": admission_ops},
        "bytes_per_customer": round((m1b - m0) / customers, 1),
        "bytes_per_customer_with_creation_op": round((m1 - m0) / customers, 1),
        "bytes_per_customer_asset": round((m3 - m1b) / customers, 1),
        "bytes_per_customer_asset_with_op_record": round((m2 - m1b) / customers, 1),
        "breakdown_bytes": breakdown,
        "ledger_bytes_per_entry": round(per_entry, 1),
        "ledger_bytes_at_cap_per_customer": round(per_entry * 10_000),
    }


def _with_key(core: MeterCore, cid: str, spec: CustomerConfig) -> Flow[None]:
    yield from core.put_customer(cid, spec)
    yield from core.add_api_key(cid, f"key-{cid}")
