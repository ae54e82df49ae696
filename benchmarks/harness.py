"""Processes of a benchmark run: a private redis-server, servers under test, wrk, CPU accounting."""

from __future__ import annotations

import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
REPORT_LUA = HERE / "wrk" / "report.lua"
ZIPF_LUA = HERE / "wrk" / "zipf.lua"  # report.lua's reporting, each request a Zipf-drawn API key
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    """In a child before exec: get SIGKILL when the benchmark process dies, however it dies."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """Return a loopback TCP port that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            out += [child, *_descendants(child)]
    return out


def cpu_seconds(pid: int) -> float:
    """Return user+system CPU seconds of a process and its live descendants."""
    total = 0.0
    for p in [pid, *_descendants(pid)]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        except (OSError, IndexError, ValueError):
            continue
    return total


class RedisServer:
    """A private redis-server on a free loopback port, nothing persisted."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed: apt-get install -y redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                *(binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--dir", str(self.workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@dataclass
class Server:
    """One server under test in its own process, started from an argv."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, **self.env, "PYTHONPATH": str(HERE)}
        stderr = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=HERE,
            preexec_fn=_die_with_parent,
        )

    def wait_ready(self, path: str = "/ready", timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}; see {self.log}"
                )
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", path)
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not become ready; see {self.log}")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def wrk(
    url: str,
    *,
    connections: int,
    duration_s: int,
    headers: list[str] | None = None,
    script: Path = REPORT_LUA,
    script_args: list[str] | None = None,
) -> dict[str, Any]:
    """Run wrk (one thread) against `url` and return its summary (latencies in microseconds).

    `script` must print report.lua's line; `script_args` are passed to its `init`.
    """
    # wrk takes whole seconds only
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "5s"]
    argv += ["-s", str(script)]
    for h in headers or []:
        argv += ["-H", h]
    argv.append(url)
    if script_args:
        argv += ["--", *script_args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            result: dict[str, Any] = json.loads(line[8:])
            result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
            result["errors"] = sum(
                result[k] for k in ("connect", "read", "write", "status", "timeout")
            )
            return result
    raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """Describe the machine and the software versions the numbers depend on."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    dists = [
        "metergate", "starlette", "uvicorn", "uvloop", "httptools", "httpx", "httpcore",
        "aiohttp", "redis", "hiredis", "slowapi", "limits", "flask", "gunicorn", "waitress",
        "lupa",
    ]  # fmt: skip
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "redis_server": next((w[2:] for w in redis_version if w.startswith("v=")), "unknown"),
        "wrk": (wrk_version.stdout + wrk_version.stderr).split("[")[0].strip(),
        "packages": {d: _version(d) for d in dists},
        "loadavg_at_start": [round(x, 2) for x in load],
    }
