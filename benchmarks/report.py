"""Turn measurements into paired medians, target checks and the markdown table."""

from __future__ import annotations

import statistics
from typing import Any

GROUP_TITLES = {
    "asgi-uvloop": "Starlette on uvicorn (uvloop, httptools)",
    "asgi-asyncio": "Starlette on uvicorn (asyncio loop, httptools)",
    "wsgi-gunicorn": "Flask on gunicorn (1 worker, gthread, 8 threads)",
    "wsgi-waitress": "Flask on waitress (8 threads)",
    "proxy": "Reverse proxy vs the upstream directly (upstream: the bare Starlette app, uvloop)",
    "zipf": "Starlette on uvicorn (uvloop), each request from a customer drawn Zipf(1.1)",
}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _by(measurements: list[dict[str, Any]]) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    return {(m["group"], m["server"], m["round"], m["connections"]): m for m in measurements}


def summarize(measurements: list[dict[str, Any]], groups: dict[str, Any]) -> dict[str, Any]:
    """Per group and variant: medians of the per-round paired ratios and latency differences."""
    index = _by(measurements)
    rounds = sorted({m["round"] for m in measurements})
    out: dict[str, Any] = {}
    for group, spec in groups.items():
        base = spec["baseline"]
        rows: dict[str, Any] = {}
        for server in [base, *spec["variants"]]:
            ratios, d50, d99, rps, p50, p99, cpu, rcpu, errors, foreign = ([] for _ in range(10))
            for r in range(len(rounds)):
                t, b = (
                    index.get((group, server, rounds[r], 64)),
                    index.get((group, base, rounds[r], 64)),
                )
                lt, lb = (
                    index.get((group, server, rounds[r], 1)),
                    index.get((group, base, rounds[r], 1)),
                )
                if t and b:
                    ratios.append(t["rps"] / b["rps"])
                    rps.append(t["rps"])
                    cpu.append(t["server_cpu_us"])
                    rcpu.append(t["redis_cpu_us"])
                    foreign.append(t["foreign_cores"])
                    errors.append(t["errors"])
                if lt and lb:
                    d50.append(lt["p50_us"] - lb["p50_us"])
                    d99.append(lt["p99_us"] - lb["p99_us"])
                    p50.append(lt["p50_us"])
                    p99.append(lt["p99_us"])
                    errors.append(lt["errors"])
            rows[server] = {
                "label": spec["labels"][server],
                "ratio": _median(ratios),
                "ratios": [round(x, 3) for x in ratios],
                "added_p50_us": _median(d50),
                "added_p99_us": _median(d99),
                "rps_64": _median(rps),
                "p50_us_1": _median(p50),
                "p99_us_1": _median(p99),
                "server_cpu_us_per_request": _median(cpu),
                "redis_cpu_us_per_request": _median(rcpu),
                "foreign_cores": _median(foreign),
                "errors": sum(errors),
            }
        out[group] = {"baseline": base, "variants": rows}
    return out


def paired_quotient(
    measurements: list[dict[str, Any]], group: str, num: str, den: str, base: str
) -> float | None:
    """Median over rounds of ratio(num)/ratio(den), both paired with `base` in the same round."""
    index = _by(measurements)
    values = []
    for r in sorted({m["round"] for m in measurements}):
        a, b, c = (index.get((group, s, r, 64)) for s in (num, den, base))
        if a and b and c:
            values.append((a["rps"] / c["rps"]) / (b["rps"] / c["rps"]))
    return _median(values)


def _fmt(value: float | None, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{unit}"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:+,.0f} us"


README_START = "<!-- benchmarks: written by benchmarks/run.py from its latest full run -->"
README_END = "<!-- benchmarks: end -->"


def readme_block(results: dict[str, Any]) -> str:
    """The summary the README shows: when, on what, and the targets table."""
    m = results["machine"]
    lines = [
        README_START,
        f"Latest full run: {results['date'][:10]}, {m['cpu_model']}, {m['cores']} cores,"
        f" Python {m['python']}, redis-server {m['redis_server']} (server, Redis and wrk share"
        " the cores). Medians of paired ratios; every table is in `benchmarks/RESULTS.md`.",
        "",
        "| target | wanted | measured | met |",
        "|---|---|---|---|",
    ]
    for t in results["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['name']} | {t['wanted']} | {t['measured']} | {met} |")
    lines.append(README_END)
    return "\n".join(lines)


def publish_readme(readme: str, results: dict[str, Any]) -> str:
    """Return the README with its benchmark block replaced by this run's."""
    start, end = readme.index(README_START), readme.index(README_END) + len(README_END)
    return readme[:start] + readme_block(results) + readme[end:]


def markdown(results: dict[str, Any]) -> str:
    """Render the results as a markdown report."""
    m = results["machine"]
    lines = [
        f"# metergate benchmarks ({'quick' if results['quick'] else 'full'} run)",
        "",
        f"- date: {results['date']} (took {results['seconds']:.0f} s)",
        f"- machine: {m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']},"
        f" Python {m['python']}, redis-server {m['redis_server']}, {m['wrk']}",
        f"- load: {results['rounds']} interleaved rounds; throughput: wrk 1 thread, 64 connections,"
        f" {results['duration_s']:g} s; latency: 1 connection, {results['latency_duration_s']:g} s",
        f"- load average at start {m['loadavg_at_start']}, at end {results['loadavg_at_end']};"
        f" other processes used a median {_fmt(results['foreign_cores_median'])} cores"
        " during the measurements (2 cores in all)",
    ]
    lines += ["", "## Targets (medians of paired ratios)", ""]
    lines += ["| target | wanted | measured | met |", "|---|---|---|---|"]
    for t in results["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['name']} | {t['wanted']} | {t['measured']} | {met} |")
    for group, data in results["http"].items():
        lines += ["", f"## {GROUP_TITLES.get(group, group)}", ""]
        lines += [
            "| variant | req/s at 64 conn | ratio to baseline | added p50 at 1 conn"
            " | added p99 at 1 conn | p50 / p99 at 1 conn | server CPU per req | Redis CPU per req"
            " | errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for server, row in data["variants"].items():
            is_base = server == data["baseline"]
            lines.append(
                f"| {row['label']}{' (baseline)' if is_base else ''} | {_fmt(row['rps_64'], 0)}"
                f" | {'1' if is_base else _fmt(row['ratio'])}"
                f" {'' if is_base else str(row['ratios'])}"
                f" | {'-' if is_base else _us(row['added_p50_us'])}"
                f" | {'-' if is_base else _us(row['added_p99_us'])}"
                f" | {_fmt(row['p50_us_1'], 0)} / {_fmt(row['p99_us_1'], 0)} us"
                f" | {_fmt(row['server_cpu_us_per_request'], 0)} us"
                f" | {_fmt(row['redis_cpu_us_per_request'], 0)} us | {row['errors']} |"
            )
    if "loops" in results:
        lines += ["", "## uvloop vs asyncio (req/s at 64 connections, medians)", ""]
        lines += ["| app | uvloop | asyncio | uvloop / asyncio |", "|---|---|---|---|"]
        for app, row in results["loops"].items():
            lines.append(
                f"| {app} | {_fmt(row['uvloop'], 0)} | {_fmt(row['asyncio'], 0)}"
                f" | {_fmt(row['speedup'])} |"
            )
    if "proxy_ranking" in results:
        lines += ["", "Upstream clients, fastest first (metered proxy ratio to direct):", ""]
        for i, row in enumerate(results["proxy_ranking"], 1):
            lines.append(
                f"{i}. {row['label']}: {_fmt(row['ratio'])} of direct,"
                f" added p50 {_us(row['added_p50_us'])}"
            )
    for key in ("overhead", "redis_cpu", "embedded", "memory"):
        if "error" in results.get(key, {}):
            lines += ["", f"## {key}: failed", "", f"    {results[key]['error']}"]
    if "rows" in results.get("overhead", {}):
        o = results["overhead"]
        lines += [
            "",
            "## CPU per request in-process (benchmarks/inproc.py: no HTTP server, 64 tasks,"
            " real Redis)",
            "",
            "The floors: one more ASGI layer doing nothing, and one PING per request on the same"
            " pipelined connection (what any middleware that asks Redis something pays).",
            "",
            "| step | CPU per request | added to bare | Redis CPU per request |",
            "|---|---|---|---|",
        ]
        for row in o["rows"]:
            lines.append(
                f"| {row['step']} | {row['cpu_us_per_request']:,.0f} us"
                f" | {row['added_cpu_us']:+,.0f} us"
                f" | {row['redis_cpu_us_per_request']:,.0f} us |"
            )
        if o.get("not_200"):
            lines.append(f"\nAnswers other than 200 (storage timeouts under load): {o['not_200']}")
    if "grid" in results.get("redis_cpu", {}):
        rc = results["redis_cpu"]
        incr = rc["incr"]
        lines += ["", "## Redis time per admission (INFO commandstats, medians)", ""]
        lines += [
            f"Plain INCR: {incr['usec_per_call']} us per call (usec_per_call),"
            f" {_fmt(incr['redis_cpu_us'], 1)} us of redis-server CPU per call.",
            "",
            "| assets | tiers | EVALSHA usec_per_call | x INCR | redis-server CPU per admission"
            " | commands inside the script |",
            "|---|---|---|---|---|---|",
        ]
        for row in rc["grid"]:
            lines.append(
                f"| {row['assets']} | {row['tiers']} | {row['usec_per_call']} us"
                f" | {_fmt(row['usec_per_call'] / max(incr['usec_per_call'], 0.01), 0)}"
                f" | {_fmt(row['redis_cpu_us'], 0)} us | {_fmt(row['inner_commands'], 0)} |"
            )
        g = rc.get("growth")
        if g:
            lines += ["", f"Growth: {g['summary']}"]
    if "sync_admissions_per_s" in results.get("embedded", {}):
        e = results["embedded"]
        lines += [
            "",
            "## Embedded backend (memory://: in-process keyspace + lupa, one thread)",
            "",
            f"- Meter (sync): {e['sync_admissions_per_s']:,} admissions/s;"
            f" AsyncMeter: {e['async_admissions_per_s']:,} admissions/s",
        ]
    if "breakdown_bytes" in results.get("memory", {}):
        mem = results["memory"]
        b = mem["breakdown_bytes"]
        lines += [
            "",
            f"## Redis memory with {mem['customers']:,} customers (INFO memory used_memory)",
            "",
            f"- per customer (entitlement, balance, API key, first ledger entry):"
            f" {mem['bytes_per_customer']:,.0f} bytes",
            "- per customer asset after its first admission:"
            f" {mem['bytes_per_customer_asset']:,.0f} bytes"
            + (
                f" ({mem['bytes_per_customer_asset_with_op_record']:,.0f} bytes while the"
                " admission's idempotency record lives)"
                if mem["operation_records_dropped"]["admission"]
                else " (admissions without an Idempotency-Key keep no operation record)"
            ),
            f"- MEMORY USAGE of one customer's keys: customer hash {b['customer_hash']},"
            f" balance hash {b['balance_hash']}, asset hash {b['asset_hash']} bytes"
            + (
                f", operation record {b['operation_record']} bytes" if b["operation_record"] else ""
            ),
            f"- the ledger gains {mem['ledger_bytes_per_entry']:,.0f} bytes per priced admission"
            " (charges of one usage window share one line)",
        ]
    return "\n".join(lines) + "\n"
