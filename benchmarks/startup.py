"""Start-up with many customers: the time of `load_config`, and of a first and a second bootstrap.

    python benchmarks/startup.py [--customers 10000] [--redis redis://127.0.0.1:6390/0]

The config is the benchmark scenario's with `--customers` customers, each with a plain API key
(hashed on load) and a balance. `load_config` reads it from a YAML file (best of three runs). Then
two meters start one after the other on one store: the first loads every customer; the second
finds them stored unchanged. Each start's time and its storage calls (a pipelined batch counts
as one) are printed. `--redis` names a Redis to use as well as the embedded backend; it is
flushed first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import scenario
import yaml

import metergate.config
from metergate import Meter, load_config
from metergate.config import GatewayConfig


def config(storage_url: str, customers: int) -> dict[str, Any]:
    """Return the scenario's config with `customers` customers, each with a key and a balance."""
    cfg = scenario.gateway_config(storage_url)
    cfg["customers"] = {
        f"customer-{i:06d}": {
            "api_keys": [f"key-{i:06d}-{uuid.UUID(int=i).hex}"],
            "entitlement": {"plan": "bench"},
            "balances": {"credits": {"amount": scenario.CREDITS}},
        }
        for i in range(customers)
    }
    return cfg


def time_load(path: Path, runs: int = 3) -> tuple[float, GatewayConfig]:
    """Return the best time of `runs` loads of the file, and the config it holds."""
    best, cfg = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        cfg = load_config(path)
        best = min(best, time.perf_counter() - start)
    assert cfg is not None
    return best, cfg


def time_start(cfg: GatewayConfig) -> tuple[float, int]:
    """Start a meter (its bootstrap) and return the time it took and its storage calls."""
    with Meter(cfg) as meter:
        real_run, calls = meter.storage.run, [0]

        def counted(call: Any) -> Any:
            calls[0] += 1
            return real_run(call)

        meter.storage.run = counted  # type: ignore[method-assign]
        start = time.perf_counter()
        meter.run(meter.core.bootstrap())
        return time.perf_counter() - start, calls[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--redis", help="a Redis URL to measure as well (flushed first)")
    args = parser.parse_args()

    loader = "libyaml" if metergate.config._CLoader is not None else "pure-Python"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metergate.yaml"
        data = config("memory://startup", args.customers)
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        size = path.stat().st_size
        seconds, cfg = time_load(path)
    print(f"{args.customers} customers, {size / 2**20:.1f} MB of YAML, {loader} YAML loader")
    print(f"load_config: {seconds * 1000:8.1f} ms")

    urls = [f"memory://startup-{uuid.uuid4().hex}"]
    if args.redis:
        client = redis.Redis.from_url(args.redis)
        client.flushall()
        client.close()
        urls.append(args.redis)
    for url in urls:
        backend = "embedded" if url.startswith("memory://") else "redis"
        storage = cfg.storage.model_copy(update={"url": url})
        run_cfg = cfg.model_copy(update={"storage": storage})
        for which in ("first", "second"):
            seconds, calls = time_start(run_cfg)
            print(f"{backend:8} {which:6} start: {seconds * 1000:8.1f} ms, {calls:6} storage calls")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
