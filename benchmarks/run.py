"""Run every metergate benchmark in one interleaved run; write results/latest.json and latest.md.

    python benchmarks/run.py            # the full run (under 10 minutes on 2 cores)
    python benchmarks/run.py --quick    # a ~2 minute smoke run
    python benchmarks/run.py --quick --sections zipf   # one section

Each server under test runs in its own process; a private redis-server serves the run. In every
round, each variant is measured right after (or before) its baseline, in rotated order, and every
ratio is taken within one round, so slow drifts of a noisy machine cancel out.

The zipf section meters many customers (10,000 by default) instead of one: each request carries
the API key of a customer drawn from Zipf(1.1) (benchmarks/wrk/zipf.lua), the bare baseline
included, so most customers are quiet and a few are busy.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import harness
import inproc
import redis as redis_py
import report
import scenario
import storage_bench
from harness import HERE, RedisServer, Server, free_port

from metergate.config import AllowancesConfig
from metergate.core.keys import Keys

PY = sys.executable
SECTIONS = ("asgi", "wsgi", "proxy", "zipf", "overhead", "redis", "embedded", "memory")
LOOPS = ("uvloop", "asyncio")
ZIPF_S = 1.1  # the exponent of the customers' popularity in the zipf section
ZIPF_SEED = 1  # every server of the zipf section is sent the same sequence of customers
# An allowance is settled within its ttl of being taken (its flush: at most flush_ms later).
ALLOWANCES_SETTLED_S = (AllowancesConfig().flush_ms + AllowancesConfig().ttl) / 1000 + 0.5
# proxies.py also has HttpxTransportProxy (httpx without the Client layer); it measured like
# httpcore, the engine under it, and is left out to keep the full run under 10 minutes.
PROXY_CLIENTS = {
    "proxy-metergate": ("proxy_metergate", "metergate.create_app (metergate.upstream, as shipped)"),
    "proxy-httpx-client": ("proxy_httpx_client", "httpx.AsyncClient tuned"),
    "proxy-httpcore": ("proxy_httpcore", "httpcore AsyncConnectionPool"),
    "proxy-aiohttp": ("proxy_aiohttp", "aiohttp ClientSession"),
    "proxy-lean": ("proxy_lean", "lean pooled HTTP/1.1 client (benchmarks/leanhttp.py)"),
}
# Not another client: the shipped proxy with local allowances on (most requests admitted in process).
PROXY_ALLOWANCES = ("proxy-allowances", "proxy_allowances", "metergate.create_app, allowances")


def uvicorn(factory: str, loop: str, port: int) -> list[str]:
    """The uvicorn command line of one server: one process, no access log."""
    return [
        *(PY, "-m", "uvicorn", "--factory", f"apps:{factory}", "--host", "127.0.0.1"),
        *("--port", str(port), "--no-access-log", "--log-level", "warning"),
        *("--loop", loop, "--http", "httptools"),
    ]


def wsgi_server(kind: str, factory: str, port: int) -> list[str]:
    """The gunicorn (1 gthread worker) or waitress command line, 8 threads each."""
    if kind == "gunicorn":
        return [
            *(PY, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "8"),
            *("-b", f"127.0.0.1:{port}", "--log-level", "warning", f"apps:{factory}()"),
        ]
    return [
        PY,
        "-m",
        "waitress",
        f"--listen=127.0.0.1:{port}",
        "--threads=8",
        "--call",
        f"apps:{factory}",
    ]


def plan(
    sections: set[str], redis_url: str, logs: Path, zipf_customers: int = 10_000
) -> tuple[dict[str, Server], dict]:
    """Return the servers to start and the groups: a baseline and its variants each.

    A group with "customers" is loaded with Zipf-drawn API keys of that many customers.
    """
    servers: dict[str, Server] = {}
    groups: dict[str, Any] = {}

    def add(name: str, argv_of: Any, env: dict[str, str] | None = None) -> None:
        port = free_port()
        servers[name] = Server(
            name, argv_of(port), port, {"MG_BENCH_REDIS": redis_url, **(env or {})}, logs / name
        )

    if "asgi" in sections or "proxy" in sections:
        for loop in LOOPS if "asgi" in sections else ("uvloop",):
            for app in ("bare", "metered", "allowances", "slowapi", "roundtrip"):
                if app != "bare" and "asgi" not in sections:
                    continue
                add(
                    f"starlette-{app}@{loop}",
                    lambda p, a=app, lp=loop: uvicorn(f"starlette_{a}", lp, p),
                )
        if "asgi" in sections:
            for loop in LOOPS:
                groups[f"asgi-{loop}"] = {
                    "baseline": f"starlette-bare@{loop}",
                    "variants": [
                        f"starlette-metered@{loop}",
                        f"starlette-allowances@{loop}",
                        f"starlette-slowapi@{loop}",
                        f"starlette-roundtrip@{loop}",
                    ],
                    "labels": {
                        f"starlette-bare@{loop}": "bare Starlette",
                        f"starlette-metered@{loop}": "MeteringMiddleware",
                        f"starlette-allowances@{loop}": "MeteringMiddleware, allowances",
                        f"starlette-slowapi@{loop}": "slowapi + limits (Redis)",
                        f"starlette-roundtrip@{loop}": "floor: one pipelined PING per request",
                    },
                }
    if "wsgi" in sections:
        for kind in ("gunicorn", "waitress"):
            for app in ("bare", "metered", "allowances"):
                add(f"flask-{app}@{kind}", lambda p, k=kind, a=app: wsgi_server(k, f"flask_{a}", p))
            groups[f"wsgi-{kind}"] = {
                "baseline": f"flask-bare@{kind}",
                "variants": [f"flask-metered@{kind}", f"flask-allowances@{kind}"],
                "labels": {
                    f"flask-bare@{kind}": "bare Flask",
                    f"flask-metered@{kind}": "WSGIMeteringMiddleware",
                    f"flask-allowances@{kind}": "WSGIMeteringMiddleware, allowances",
                },
            }
    if "zipf" in sections:
        env = {"MG_BENCH_CUSTOMERS": str(zipf_customers)}
        factories = {
            "starlette-bare@zipf": ("starlette_bare", "bare Starlette"),
            "starlette-metered@zipf": ("starlette_metered_zipf", "MeteringMiddleware"),
            "starlette-allowances@zipf": (
                "starlette_allowances_zipf",
                "MeteringMiddleware, allowances",
            ),
        }
        for name, (factory, _) in factories.items():
            add(name, lambda p, f=factory: uvicorn(f, "uvloop", p), env)
        groups["zipf"] = {
            "baseline": "starlette-bare@zipf",
            "variants": ["starlette-metered@zipf", "starlette-allowances@zipf"],
            "labels": {k: v[1] for k, v in factories.items()},
            "customers": zipf_customers,
        }
    if "proxy" in sections:
        upstream = "starlette-bare@uvloop"
        env = {"MG_BENCH_UPSTREAM": f"http://127.0.0.1:{servers[upstream].port}"}
        local, local_factory, local_label = PROXY_ALLOWANCES
        for name, (factory, _) in [*PROXY_CLIENTS.items(), (local, (local_factory, ""))]:
            add(name, lambda p, f=factory: uvicorn(f, "uvloop", p), env)
        groups["proxy"] = {
            "baseline": upstream,
            "variants": [*PROXY_CLIENTS, local],
            "labels": {
                upstream: "upstream directly",
                **{k: v[1] for k, v in PROXY_CLIENTS.items()},
                local: local_label,
            },
            "upstream": upstream,
        }
    return servers, groups


class Probe:
    """CPU of the servers involved, Redis, wrk and everything else on the machine, around a load."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return (sum(fields) - fields[3] - fields[4]) / harness.CLOCK_TICKS

    def _ours(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once waited for
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def __enter__(self) -> Probe:
        self.t0 = time.perf_counter()
        self.cpu0 = {k: harness.cpu_seconds(p) for k, p in self.pids.items()}
        self.busy0, self.ours0 = self._busy(), self._ours()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = {k: harness.cpu_seconds(p) - self.cpu0[k] for k, p in self.pids.items()}
        ours = self._ours() - self.ours0 + sum(self.cpu.values())
        self.foreign_cores = max(0.0, (self._busy() - self.busy0 - ours) / self.wall)


def settle(pids: list[int], timeout_s: float = 10.0) -> float:
    """Wait until the processes are idle (at most one 10 ms tick of CPU in 200 ms); return seconds.

    A server that fell behind keeps working on the requests of connections wrk closed at the end
    of a run; the next measurement must not queue behind that backlog.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        before = sum(harness.cpu_seconds(p) for p in pids)
        time.sleep(0.2)
        if sum(harness.cpu_seconds(p) for p in pids) - before <= 1.0 / harness.CLOCK_TICKS:
            break
    return time.monotonic() - start


def load(group: dict[str, Any]) -> dict[str, Any]:
    """The wrk arguments of a group's load: the one API key, or Zipf-drawn keys of its customers."""
    if "customers" in group:
        args = [str(group["customers"]), str(ZIPF_S), str(ZIPF_SEED)]
        return {"script": harness.ZIPF_LUA, "script_args": args}
    return {"headers": [scenario.AUTH_HEADER]}


def customers_of(group: dict[str, Any]) -> list[str]:
    """The customers a group's load charges."""
    if "customers" in group:
        return [scenario.customer_id(i) for i in range(group["customers"])]
    return [scenario.CUSTOMER]


def charged(client: redis_py.Redis, customers: list[str]) -> int:
    """Return the credits charged to the customers' balances since they were seeded."""
    keys = Keys()
    pipe = client.pipeline(transaction=False)
    for customer in customers:
        pipe.hget(keys.balance(customer, "credits")[0], "amt")
    return sum(scenario.CREDITS - int(amount) for amount in pipe.execute() if amount is not None)


def measure(
    args: argparse.Namespace,
    servers: dict[str, Server],
    redis: RedisServer,
    group: dict[str, Any],
    name: str,
    reseed: Callable[[redis_py.Redis], None],
) -> list[dict[str, Any]]:
    """Throughput at 64 connections, then latency at 1 connection, of one server."""
    client = redis.client()
    reseed(client)
    server = servers[name]
    pids = {"server": server.proc.pid, "redis": redis.pid}  # type: ignore[union-attr]
    if "upstream" in group and name != group["upstream"]:
        pids["upstream"] = servers[group["upstream"]].proc.pid  # type: ignore[union-attr]
    out = []
    for connections, seconds in ((64, args.duration), (1, args.latency_duration)):
        drained = settle(list(pids.values()))
        with Probe(pids) as probe:
            result = harness.wrk(
                server.url + scenario.PATH,
                connections=connections,
                duration_s=seconds,
                **load(group),
            )
        n = max(1, result["requests"])
        result.update(
            connections=connections,
            server_cpu_us=probe.cpu["server"] / n * 1e6,
            redis_cpu_us=probe.cpu["redis"] / n * 1e6,
            upstream_cpu_us=probe.cpu.get("upstream", 0.0) / n * 1e6,
            foreign_cores=probe.foreign_cores,
            drained_s=round(drained, 2),
        )
        out.append(result)
    # Metering really happened: the balances were charged once per answered request.
    if "customers" in group and "allowances" in name:
        time.sleep(ALLOWANCES_SETTLED_S)  # until this process settled its last allowances
    total = charged(client, customers_of(group))
    client.close()
    for result in out:
        result["charged_in_pair"] = total
        result["requests_in_pair"] = sum(r["requests"] for r in out)
        # answered 2xx; the requests in flight when wrk stopped may be charged too
        result["answered_in_pair"] = sum(r["requests"] - r["status"] for r in out)
        result["in_flight_in_pair"] = sum(r["connections"] for r in out)
    return out


def get(server: Server, api_key: str) -> http.client.HTTPResponse:
    """GET the metered path of a server with an API key; the response is read."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", scenario.PATH, headers={"Authorization": f"Bearer {api_key}"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def wait_started(server: Server, api_key: str, timeout_s: float = 300.0) -> None:
    """Wait until a metered server admits `api_key`: it has loaded its configured customers."""
    deadline = time.monotonic() + timeout_s
    while get(server, api_key).status != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} did not admit {api_key}; see {server.log}")
        time.sleep(0.1)


def sanity(servers: dict[str, Server], api_keys: dict[str, str]) -> dict[str, Any]:
    """One request to each server: it must answer 200, and metered ones must carry our fields."""
    out = {}
    for name, server in servers.items():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        api_key = api_keys.get(name, scenario.API_KEY)
        conn.request("GET", scenario.PATH, headers={"Authorization": f"Bearer {api_key}"})
        response = conn.getresponse()
        body = response.read()
        fields = {k.lower() for k, _ in response.getheaders()}
        conn.close()
        metered = "metered" in name or name.startswith("proxy-")
        ok = response.status == 200 and body.startswith(b'{"hello"')
        ok = ok and (not metered or "metergate-balance" in fields)
        out[name] = {"status": response.status, "ok": ok, "metered": "metergate-balance" in fields}
        if not ok:
            raise SystemExit(
                f"{name}: GET {scenario.PATH} answered {response.status}: {body[:300]!r}"
            )
    return out


def wait_quiet(seconds: float) -> None:
    """Wait (up to `seconds`) for the 1-minute load average to drop below 1."""
    deadline = time.monotonic() + seconds
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        print(f"  waiting for a quieter machine (load {os.getloadavg()[0]:.2f})", flush=True)
        time.sleep(15)


def http_sections(args: argparse.Namespace, redis: RedisServer, logs: Path) -> tuple:
    """Start the servers, run the interleaved rounds, stop the servers."""
    servers, groups = plan(args.sections, redis.url, logs, args.zipf_customers)
    if not servers:
        return [], {}, {}
    reseeds, loads, api_keys = {}, {}, {}
    config = scenario.gateway_config(redis.url)
    for group_name, group in groups.items():
        members = [group["baseline"], *group["variants"]]
        loads |= dict.fromkeys(members, load(group))
        if "customers" not in group:
            reseeds[group_name] = lambda client: storage_bench.reseed(client, config)
            continue
        # Loaded before the servers start, so that they find (and remember) these very keys;
        # each measurement restores them, far faster than loading them again.
        n = group["customers"]
        t0 = time.monotonic()
        client = redis.client()
        storage_bench.reseed(client, scenario.gateway_config(redis.url, customers=n))
        client.close()
        keys = storage_bench.snapshot(redis.url)
        print(f"{group_name}: {n:,} customers loaded in {time.monotonic() - t0:.1f} s", flush=True)
        reseeds[group_name] = lambda client, k=keys: storage_bench.restore(client, k)
        api_keys |= dict.fromkeys(members, scenario.customer_key(n - 1))
    started = []
    try:
        t0 = time.monotonic()
        for server in servers.values():
            server.start()
            started.append(server)
        startup = {}
        for server in servers.values():
            server.wait_ready()
            if server.name in api_keys and "bare" not in server.name:
                wait_started(server, api_keys[server.name])
                startup[server.name] = time.monotonic() - t0
                print(
                    f"  {server.name} admits its last customer after {startup[server.name]:.1f} s"
                )
        checks = sanity(servers, api_keys)
        for name, seconds in startup.items():
            checks[name]["startup_s"] = round(seconds, 1)
        for server in servers.values():  # warm up: connections, caches, the script cache
            harness.wrk(server.url + scenario.PATH, connections=16, duration_s=args.warmup,
                        **loads.get(server.name, load({})))  # fmt: skip
        measurements: list[dict[str, Any]] = []
        names = list(groups)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for group_name in names[r % len(names) :] + names[: r % len(names)]:
                group = groups[group_name]
                order = [group["baseline"], *group["variants"]]
                order = order[r % len(order) :] + order[: r % len(order)]
                for name in order:
                    reseed = reseeds[group_name]
                    for result in measure(args, servers, redis, group, name, reseed):
                        result.update(round=r, group=group_name, server=name)
                        measurements.append(result)
                        print(
                            f"  {group_name:14} {name:28} c={result['connections']:<3}"
                            f" {result['rps']:9,.0f} req/s  p50 {result['p50_us']:>7,} us"
                            f"  p99 {result['p99_us']:>8,} us  err {result['errors']}"
                            f"  other load {result['foreign_cores']:.2f}",
                            flush=True,
                        )
        return measurements, groups, checks
    finally:
        for server in started:
            server.stop()


def targets(results: dict[str, Any], measurements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check the issue's targets against the medians."""
    http, out = results["http"], []

    def add(name: str, wanted: str, value: float | None, passes: Any, shown: str = "") -> None:
        met = None if passes is None else bool(passes)
        shown = shown or report._fmt(value)
        out.append({"name": name, "wanted": wanted, "value": value, "met": met, "measured": shown})

    if "asgi-uvloop" in http:
        row = http["asgi-uvloop"]["variants"]["starlette-metered@uvloop"]
        ratio, p50 = row["ratio"], row["added_p50_us"]
        name = "MeteringMiddleware throughput vs bare (uvicorn, uvloop)"
        add(name, ">= 0.85", ratio, ratio is not None and ratio >= 0.85)
        name = "MeteringMiddleware added p50 at 1 connection"
        add(name, "<= 150 us", p50, p50 is not None and p50 <= 150, report._us(p50))
        floor = http["asgi-uvloop"]["variants"].get("starlette-roundtrip@uvloop")
        if floor is not None:
            name = "(reference) one pipelined PING per request: throughput vs bare"
            add(name, "-", floor["ratio"], None)
            name = "(reference) one pipelined PING per request: added p50 at 1 connection"
            add(name, "-", floor["added_p50_us"], None, report._us(floor["added_p50_us"]))
        quotient = report.paired_quotient(
            measurements,
            "asgi-uvloop",
            "starlette-metered@uvloop",
            "starlette-slowapi@uvloop",
            "starlette-bare@uvloop",
        )
        name = "MeteringMiddleware ratio / slowapi ratio"
        ok = quotient is not None and quotient >= 4
        add(name, ">= 4x", quotient, ok, report._fmt(quotient, unit="x"))
        local = http["asgi-uvloop"]["variants"].get("starlette-allowances@uvloop")
        if local is not None:
            ratio, p50 = local["ratio"], local["added_p50_us"]
            name = "with allowances: MeteringMiddleware throughput vs bare (uvloop)"
            add(name, ">= 0.80", ratio, ratio is not None and ratio >= 0.80)
            name = "with allowances: added p50 at 1 connection"
            add(name, "<= 60 us", p50, p50 is not None and p50 <= 60, report._us(p50))
            quotient = report.paired_quotient(
                measurements,
                "asgi-uvloop",
                "starlette-allowances@uvloop",
                "starlette-slowapi@uvloop",
                "starlette-bare@uvloop",
            )
            name = "with allowances: ratio / slowapi ratio"
            ok = quotient is not None and quotient >= 4
            add(name, ">= 4x", quotient, ok, report._fmt(quotient, unit="x"))
            name = "with allowances: Redis CPU per request"
            cpu = local.get("redis_cpu_us_per_request")
            add(name, "<= 3 us", cpu, cpu is not None and cpu <= 3, report._fmt(cpu, 1, " us"))
    if "zipf" in http:
        zipf_targets(results, measurements, add)
    for kind in ("gunicorn", "waitress"):
        if f"wsgi-{kind}" in http:
            ratio = http[f"wsgi-{kind}"]["variants"][f"flask-metered@{kind}"]["ratio"]
            name = f"WSGIMeteringMiddleware throughput vs bare ({kind})"
            add(name, ">= 0.8", ratio, ratio is not None and ratio >= 0.8)
            local = http[f"wsgi-{kind}"]["variants"].get(f"flask-allowances@{kind}")
            if local is not None:
                ratio = local["ratio"]
                name = f"with allowances: WSGIMeteringMiddleware throughput vs bare ({kind})"
                add(name, ">= 0.85", ratio, ratio is not None and ratio >= 0.85)
    if "proxy" in http:
        ratio = http["proxy"]["variants"]["proxy-metergate"]["ratio"]
        name = "reverse proxy (as shipped) throughput vs direct"
        add(name, ">= 0.5", ratio, ratio is not None and ratio >= 0.5)
        best = max(results["proxy_ranking"], key=lambda r: r["ratio"] or 0)
        name = f"reverse proxy with the fastest client ({best['label']})"
        add(name, ">= 0.5", best["ratio"], best["ratio"] is not None and best["ratio"] >= 0.5)
        local = http["proxy"]["variants"].get(PROXY_ALLOWANCES[0])
        if local is not None:
            name = "with allowances: reverse proxy (as shipped) throughput vs direct"
            add(
                name, ">= 0.5", local["ratio"], local["ratio"] is not None and local["ratio"] >= 0.5
            )
    if "grid" in results.get("redis_cpu", {}):
        grid = {(g["assets"], g["tiers"]): g for g in results["redis_cpu"]["grid"]}
        single = [grid[k]["usec_per_call"] for k in grid if k[0] == 1]
        worst = max(single) if single else None
        name = "Redis time per single-asset admission (EVALSHA usec_per_call, worst tier count)"
        ok = worst is not None and worst <= 15
        add(name, "<= 15 us", worst, ok, report._fmt(worst, 1, " us"))
        growth = results["redis_cpu"].get("growth")
        if growth:
            name = "cost growth with assets and tiers"
            add(name, "at most linear", None, growth["linear"], growth["short"])
    return out


def zipf_targets(results: dict[str, Any], measurements: list[dict[str, Any]], add: Any) -> None:
    """The zipf section's targets: allowances >= 0.70 of bare, per request for reference."""
    rows = results["http"]["zipf"]["variants"]
    what = f"{results['zipf_customers']:,} customers drawn Zipf({ZIPF_S:g})"
    local = rows["starlette-allowances@zipf"]
    ratio, p50 = local["ratio"], local["added_p50_us"]
    add(
        f"{what}, allowances: throughput vs bare",
        ">= 0.70",
        ratio,
        ratio is not None and ratio >= 0.70,
    )
    add(f"{what}, allowances: added p50 at 1 connection", "-", p50, None, report._us(p50))
    per_request = rows["starlette-metered@zipf"]
    ratio, p50 = per_request["ratio"], per_request["added_p50_us"]
    add(f"(reference) {what}, per request: throughput vs bare", "-", ratio, None)
    name = f"(reference) {what}, per request: added p50 at 1 connection"
    add(name, "-", p50, None, report._us(p50))
    # Every answered request charged once, summed over the customers once allowances settled;
    # the requests still in flight when wrk stopped may be charged as well.
    pairs = [
        m
        for m in measurements
        if m["group"] == "zipf" and "bare" not in m["server"] and m["connections"] == 1
    ]
    extra = [m["charged_in_pair"] - m["answered_in_pair"] for m in pairs]
    ok = all(0 <= e <= m["in_flight_in_pair"] for e, m in zip(extra, pairs, strict=True))
    shown = f"{min(extra):+,} to {max(extra):+,}" if extra else "-"
    name = f"{what}: credits charged - requests answered, per measurement"
    wanted = f"0 to +{pairs[0]['in_flight_in_pair']} (in flight at the end)" if pairs else "-"
    add(name, wanted, None, ok and bool(extra), shown)
    startup = [c["startup_s"] for c in results["sanity"].values() if "startup_s" in c]
    if startup:
        name = f"(reference) {what}: start-up until the last customer is admitted"
        name += " (every server of the run starting at once)"
        add(name, "-", max(startup), None, report._fmt(max(startup), 1, " s"))


def growth(grid: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Is the cost at most linear? Growing assets (or tiers) k-fold must not cost more than k-fold.

    A fixed part per script call makes the growth sublinear at small sizes, so proportionality is
    the bound: cost(10 assets) <= 10 x cost(1 asset), cost(8 tiers) <= 4 x cost(2 tiers), with 10%
    for noise. The marginal costs per extra asset and per extra tier are reported as well.
    """
    cost = {(g["assets"], g["tiers"]): g["usec_per_call"] for g in grid}
    assets = sorted({a for a, _ in cost})
    tiers = sorted({t for _, t in cost})
    if len(assets) < 2 or len(tiers) < 2:
        return None
    lo_a, hi_a, lo_t, hi_t = assets[0], assets[-1], tiers[0], tiers[-1]
    checks = []
    for t in tiers:
        checks.append(
            (f"{lo_a}->{hi_a} assets at {t} tiers", cost[(hi_a, t)] / cost[(lo_a, t)], hi_a / lo_a)
        )
    for a in assets:
        checks.append(
            (f"{lo_t}->{hi_t} tiers at {a} assets", cost[(a, hi_t)] / cost[(a, lo_t)], hi_t / lo_t)
        )
    linear = all(grew <= bound * 1.1 for _, grew, bound in checks)
    per_asset = (cost[(hi_a, lo_t)] - cost[(lo_a, lo_t)]) / (hi_a - lo_a)
    per_tier = (cost[(hi_a, hi_t)] - cost[(hi_a, lo_t)]) / (hi_t - lo_t) / hi_a
    parts = [f"{name}: x{grew:.1f} (proportional: x{bound:g})" for name, grew, bound in checks]
    summary = (
        "; ".join(parts)
        + f". About {per_asset:.0f} us per extra asset (at {lo_t} tiers) and {per_tier:.1f} us per"
        " extra tier per asset: an asset costs its state read and write and its share of the"
        " usage window; a tier costs two arguments sent, its `from` and its other fields packed"
        " in one (only the tiers a value reaches are parsed)."
    )
    by_assets, by_tiers = checks[0], checks[len(tiers)]
    short = (
        f"{'at most linear' if linear else 'faster than linear'}: x{by_assets[1]:.1f} for"
        f" x{by_assets[2]:g} assets, x{by_tiers[1]:.1f} for x{by_tiers[2]:g} tiers"
    )
    return {"linear": linear, "checks": checks, "summary": summary, "short": short}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a ~2 minute smoke run")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (full 3, quick 1)")
    parser.add_argument("--duration", type=int, help="seconds of each 64-connection run")
    parser.add_argument("--latency-duration", type=int, help="seconds of each 1-connection run")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    parser.add_argument("--customers", type=int, help="customers for the memory section")
    parser.add_argument(
        "--zipf-customers", type=int, default=10_000, help="customers for the zipf section"
    )
    parser.add_argument("--wait-quiet", type=float, default=0, help="wait up to N s for load < 1")
    parser.add_argument(
        "--no-publish", action="store_true", help="do not update RESULTS.md and the README"
    )
    args = parser.parse_args()
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.duration = args.duration or (2 if q else 3)
    args.latency_duration = args.latency_duration or (1 if q else 2)
    args.customers = args.customers or (10_000 if q else 100_000)
    args.warmup = 1
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = args.sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")

    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    out_dir = HERE / "results"
    logs = out_dir / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": q,
        "machine": harness.machine(),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "latency_duration_s": args.latency_duration,
        "sections": sorted(args.sections),
        "zipf_customers": args.zipf_customers,
    }
    with tempfile.TemporaryDirectory(prefix="mg-bench-") as tmp:
        redis = RedisServer(Path(tmp))
        redis.start()
        try:
            measurements, groups, checks = http_sections(args, redis, logs)
            results["sanity"] = checks
            results["http"] = report.summarize(measurements, groups) if groups else {}
            results["measurements"] = measurements

            def q_or(quick: Any, full: Any) -> Any:
                return quick if q else full

            if "overhead" in args.sections:
                print("overhead: CPU per request in-process, and candidate fixes", flush=True)
                kwargs = {"requests": q_or(1280, 2560), "rounds": q_or(1, 3)}
                section(results, "overhead", inproc.measure, redis.url, redis.pid, **kwargs)
            if "redis" in args.sections:
                print("redis: time per admission", flush=True)
                kwargs = {"rounds": q_or(1, 3), "count": q_or(500, 1500)}
                kwargs |= {"assets": (1, 3, 10), "tiers": (2, 4, 8)}
                section(
                    results, "redis_cpu", storage_bench.redis_cpu, redis.url, redis.pid, **kwargs
                )
                if "grid" in results["redis_cpu"]:
                    results["redis_cpu"]["growth"] = growth(results["redis_cpu"]["grid"])
            if "embedded" in args.sections:
                print("embedded backend", flush=True)
                kwargs = {"rounds": q_or(1, 3), "seconds": q_or(1.0, 2.0)}
                section(results, "embedded", storage_bench.embedded, **kwargs)
            if "memory" in args.sections:
                print(f"memory: {args.customers:,} customers", flush=True)
                section(
                    results, "memory", storage_bench.memory, redis.url, customers=args.customers
                )
        finally:
            redis.stop()
    finish(results, args, started, out_dir)


def section(results: dict[str, Any], key: str, measure: Any, *args: Any, **kwargs: Any) -> None:
    """Run one measurement; a failure is recorded in the results instead of ending the run."""
    try:
        results[key] = measure(*args, **kwargs)
    except Exception as exc:  # report what ran; say what did not
        results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"  {key} failed: {results[key]['error']}", flush=True)


def finish(
    results: dict[str, Any], args: argparse.Namespace, started: float, out_dir: Path
) -> None:
    """Derive the comparisons and targets, write JSON and markdown, print the markdown."""
    http = results["http"]
    if "proxy" in http:
        rows = http["proxy"]["variants"]
        results["proxy_ranking"] = sorted(
            ({"server": k, **v} for k, v in rows.items() if k in PROXY_CLIENTS),
            key=lambda r: -(r["ratio"] or 0),
        )
    if "asgi-uvloop" in http and "asgi-asyncio" in http:
        results["loops"] = {}
        for app in ("bare", "metered", "slowapi"):
            uv = http["asgi-uvloop"]["variants"][f"starlette-{app}@uvloop"]["rps_64"]
            aio = http["asgi-asyncio"]["variants"][f"starlette-{app}@asyncio"]["rps_64"]
            results["loops"][app] = {
                "uvloop": uv,
                "asyncio": aio,
                "speedup": uv / aio if aio else None,
            }
    foreign = [m["foreign_cores"] for m in results["measurements"]]
    results["foreign_cores_median"] = statistics.median(foreign) if foreign else None
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = time.monotonic() - started
    results["targets"] = targets(results, results["measurements"])
    text = report.markdown(results)
    (out_dir / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out_dir / "latest.md").write_text(text)
    if not results["quick"] and not args.no_publish and set(SECTIONS) <= args.sections:
        (HERE / "RESULTS.md").write_text(text)
        readme = HERE.parent / "README.md"
        readme.write_text(report.publish_readme(readme.read_text(), results))
    print(text)


if __name__ == "__main__":
    main()
