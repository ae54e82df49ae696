"""Streamed LLM responses through the metered proxy vs direct: time to first byte, throughput.

    python benchmarks/streaming.py [--samples 200] [--rounds 5] [--words 20000]

The upstream is the OpenAI-compatible server of `examples/llm_gateway` (uvicorn, one process);
the gateway is `metergate.create_app` in front of it (uvicorn, one process) with the chat route
priced from the stream's usage (`response_json` with a `request_json` reserve) on a private
redis-server. One client connection, kept alive; direct and gateway requests alternate.

- time to first byte: from sending a streamed chat completion to its first body byte (the
  upstream sends its first event at once), `--samples` times each way;
- throughput: one completion of `--words` events (about 200 bytes each), read to its end,
  `--rounds` times each way.

Targets: the gateway adds at most 1 ms to the time to first byte, and streams at least 0.8 of
direct throughput.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import RedisServer, Server, free_port

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key"


def gateway_config(upstream: str, redis_url: str) -> dict[str, Any]:
    """One customer metered by tokens read from the stream, in front of `upstream`."""
    return {
        "storage": {"url": redis_url, "prefix": "stream-bench"},
        "metrics": {"tokens": {"type": "CumulativeCounter"}},
        "plans": {
            "p": {
                "assets": {
                    "tokens": {
                        "period": "month",
                        "tiers": [{"from": 0, "level": "Normal", "policy": "NotifyOnly"}],
                    }
                }
            }
        },
        "customers": {"c": {"api_keys": [KEY], "entitlement": {"plan": "p"}}},
        "routes": [
            {
                "path": "/v1/chat/completions",
                "methods": ["POST"],
                "meter": [
                    {
                        "metric": "tokens",
                        "cost": {
                            "response_json": "/usage/total_tokens",
                            "reserve": {"request_json": "/max_tokens", "default": 8000},
                        },
                    }
                ],
            },
            {"path": "/v1/models", "meter": []},
        ],
        "proxy": {"upstream": upstream},
    }


def gateway_app() -> Any:
    """uvicorn factory: the metered proxy configured from the environment."""
    from metergate import create_app

    return create_app(gateway_config(os.environ["STREAM_UPSTREAM"], os.environ["STREAM_REDIS"]))


def request_body(words: int) -> bytes:
    """A streamed chat completion whose answer has `words` + 2 events, usage included."""
    body = {
        "model": "echo-1",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": words + 2,
        "messages": [{"role": "user", "content": " ".join(["tok"] * words)}],
    }
    return json.dumps(body).encode()


def exchange(conn: http.client.HTTPConnection, body: bytes, first_only: bool) -> tuple[float, int]:
    """Send one completion; return (seconds to the first byte or to the end, bytes read)."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
    response = conn.getresponse()
    first = response.read(1)
    ttfb = time.perf_counter() - started
    size = len(first)
    while chunk := response.read(65536):
        size += len(chunk)
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"status {response.status}")
    return (ttfb if first_only else elapsed), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--words", type=int, default=20000)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="stream-bench-"))
    redis_server = RedisServer(workdir / "redis")
    redis_server.start()
    uvicorn = [sys.executable, "-m", "uvicorn", "--no-access-log", "--log-level", "warning"]
    upstream = Server(
        "upstream",
        [*uvicorn, "--app-dir", str(ROOT / "examples" / "llm_gateway"), "upstream:app"],
        free_port(),
        log=workdir / "upstream.log",
    )
    upstream.argv += ["--port", str(upstream.port)]
    gateway = Server(
        "gateway",
        [*uvicorn, "--factory", "streaming:gateway_app"],
        free_port(),
        env={"STREAM_UPSTREAM": upstream.url, "STREAM_REDIS": redis_server.url},
        log=workdir / "gateway.log",
    )
    gateway.argv += ["--port", str(gateway.port)]
    try:
        for server in (upstream, gateway):
            server.start()
            server.wait_ready("/v1/models")
        results: dict[str, dict[str, list[float]]] = {
            name: {"ttfb": [], "throughput": []} for name in ("direct", "gateway")
        }
        conns = {
            "direct": http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=60),
            "gateway": http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60),
        }
        small, large = request_body(8), request_body(args.words)
        for conn in conns.values():  # warm up connections, scripts and key caches
            for _ in range(20):
                exchange(conn, small, True)
        for _ in range(args.samples):
            for name, conn in conns.items():
                results[name]["ttfb"].append(exchange(conn, small, True)[0])
        for _ in range(args.rounds):
            for name, conn in conns.items():
                elapsed, size = exchange(conn, large, False)
                results[name]["throughput"].append(size / elapsed / 1e6)
        report(results, args)
    finally:
        gateway.stop()
        upstream.stop()
        redis_server.stop()


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    """Print the table row and whether the targets are met."""
    rows = []
    for name, data in results.items():
        ttfb = sorted(data["ttfb"])
        p50 = statistics.median(ttfb) * 1000
        p99 = ttfb[min(len(ttfb) - 1, int(len(ttfb) * 0.99))] * 1000
        mbps = statistics.median(data["throughput"])
        rows.append((name, p50, p99, mbps))
        print(f"| {name} | {p50:.2f} ms | {p99:.2f} ms | {mbps:.1f} MB/s |")
    added = rows[1][1] - rows[0][1]
    ratio = rows[1][3] / rows[0][3]
    print(f"added time to first byte (p50): {added:.2f} ms (target <= 1 ms)")
    print(f"streaming throughput vs direct: {ratio:.2f} (target >= 0.8)")
    print(f"samples {args.samples}, rounds {args.rounds}, {args.words} events per stream")


if __name__ == "__main__":
    main()
