"""Profile one server under wrk load with py-spy and summarise where its CPU goes.

    python benchmarks/hotspots.py starlette_metered              # uvicorn + uvloop
    python benchmarks/hotspots.py flask_metered --wsgi waitress
    python benchmarks/hotspots.py proxy_metergate --proxy        # with a bare upstream

Prints the functions with the most samples on top of the stack (self) and on the stack at all
(inclusive), and the share of each component (uvicorn, starlette, metergate modules, asyncio...).
The raw stacks are kept in results/profiles/ for flamegraph tools.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import harness
import run
import scenario
import storage_bench
from harness import HERE, RedisServer, Server, free_port

COMPONENTS = (
    ("metergate/asgi", "metergate.asgi"),
    ("metergate/wsgi", "metergate.wsgi"),
    ("metergate/proxy", "metergate.proxy"),
    ("metergate/meter", "metergate.meter"),
    ("metergate/core/flows", "metergate.core.flows"),
    ("metergate/core/http", "metergate.core.http"),
    ("metergate/core", "metergate.core (other)"),
    ("metergate/storage/pipelined", "metergate.storage.pipelined"),
    ("metergate/storage", "metergate.storage (drivers)"),
    ("metergate/periods", "metergate.periods"),
    ("metergate", "metergate (other)"),
    ("leanhttp", "benchmarks.leanhttp"),
    ("proxies", "benchmarks.proxies"),
    ("uvicorn", "uvicorn"),
    ("starlette", "starlette"),
    ("flask", "flask"),
    ("werkzeug", "werkzeug"),
    ("gunicorn", "gunicorn"),
    ("waitress", "waitress"),
    ("redis/", "redis-py"),
    ("httpx", "httpx"),
    ("httpcore", "httpcore"),
    ("h11", "h11"),
    ("aiohttp", "aiohttp"),
    ("asyncio", "asyncio"),
    ("uuid", "uuid"),
    ("json", "json"),
    ("threading", "threading"),
    ("socket", "socket"),
    ("selectors", "selectors"),
)


def component(frame: str) -> str:
    """Name the component a py-spy frame `function (path)` belongs to."""
    where = frame[frame.rfind("(") + 1 :]
    for needle, name in COMPONENTS:
        if needle in where:
            return name
    return where.rstrip(")") or frame


def summarise(raw: Path, top: int) -> str:
    """Summarise py-spy raw (collapsed) stacks: self, inclusive and per-component shares."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        parts[component(frames[-1])] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples (is the server idle, or may py-spy not attach?)"
    out = [f"{total} samples", "", "self (on top of the stack):"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "inclusive (anywhere on the stack):"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    out += ["", "self time by component:"]
    out += [f"  {100 * n / total:5.1f}%  {c}" for c, n in parts.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("factory", help="a factory of apps.py, e.g. starlette_metered")
    parser.add_argument("--loop", default="uvloop", choices=run.LOOPS)
    parser.add_argument("--wsgi", choices=("gunicorn", "waitress"), help="serve a WSGI factory")
    parser.add_argument("--proxy", action="store_true", help="start a bare upstream for a proxy")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        raise SystemExit("py-spy is missing: pip install py-spy (it is in the bench extra)")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir = HERE / "results" / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{args.factory}-{args.wsgi or args.loop}.txt"
    with tempfile.TemporaryDirectory(prefix="mg-hotspots-") as tmp:
        redis = RedisServer(Path(tmp))
        redis.start()
        servers: list[Server] = []
        try:
            env = {"MG_BENCH_REDIS": redis.url}
            if args.proxy:
                port = free_port()
                upstream = Server("upstream", run.uvicorn("starlette_bare", "uvloop", port), port)
                upstream.env = env
                servers.append(upstream)
                env = {**env, "MG_BENCH_UPSTREAM": upstream.url}
            port = free_port()
            argv = (
                run.wsgi_server(args.wsgi, args.factory, port)
                if args.wsgi
                else run.uvicorn(args.factory, args.loop, port)
            )
            server = Server(args.factory, argv, port, env, Path(tmp) / "server.log")
            servers.append(server)
            for s in servers:
                s.start()
            for s in servers:
                s.wait_ready()
            storage_bench.reseed(redis.client(), scenario.gateway_config(redis.url))
            url = server.url + scenario.PATH
            harness.wrk(url, connections=16, duration_s=1, headers=[scenario.AUTH_HEADER])
            load = subprocess.Popen(
                [
                    *("wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds + 2}s"),
                    *("-H", scenario.AUTH_HEADER, url),
                ],
                stdout=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            assert server.proc is not None
            record = subprocess.run(
                [
                    *(spy, "record", "-p", str(server.proc.pid), "-d", str(args.seconds)),
                    *("-r", "250", "-f", "raw", "--nolineno", "-o", str(raw)),
                    *(["-s"] if args.wsgi == "gunicorn" else []),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if record.returncode != 0:
                raise SystemExit(f"py-spy failed: {record.stderr.strip()}")
            load.wait()
        finally:
            for s in servers:
                s.stop()
            redis.stop()
    print(f"{args.factory} ({args.wsgi or args.loop}), {args.connections} connections; raw: {raw}")
    print(summarise(raw, args.top))


if __name__ == "__main__":
    main()
