"""Fixtures: real redis-server processes on free loopback ports, and the backends every storage test runs on."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

REQUIRE_REDIS = os.environ.get("METERGATE_REQUIRE_REDIS") == "1"


def free_port(below: int = 65536) -> int:
    """Return a loopback TCP port that is free right now (and below `below`)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port < below:
            return port


class RedisProcess:
    """A redis-server child process on a free loopback port, with nothing persisted."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        # A Cluster node also listens on port + 10000 (the cluster bus).
        self.below = 55000 if "--cluster-enabled" in extra else 65536
        self.port = free_port(self.below)
        self.workdir = workdir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server is not installed"
            if REQUIRE_REDIS:
                pytest.fail(message)
            pytest.skip(message)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):
            if self._spawn(binary):
                return
            # another process took the port between our probe and redis-server's bind
            self.port = free_port(self.below)
        raise RuntimeError(f"redis-server did not start (last port tried: {self.port})")

    def _spawn(self, binary: str) -> bool:
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    # the answer must come from our process, not another one on a reused port
                    if int(client.info("server")["process_id"]) != self.proc.pid:
                        return False
                    # INFO answers while the AOF is still loading; every other command does not
                    if not int(client.info("persistence").get("loading", 0)):
                        return True
                    if time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not finish loading its data")
                    time.sleep(0.02)
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.proc.kill()
                        self.proc.wait()
                        self.proc = None
                        return False
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A real redis-server for the whole test session."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


BACKENDS = ["memory", "redis", "cluster"]


def fresh_storage(request: pytest.FixtureRequest, backend: str) -> str:
    """A fresh, empty storage URL of `backend`: embedded, a flushed real redis-server, or a
    flushed Cluster."""
    if backend == "memory":
        return f"memory://test-{uuid.uuid4().hex}"
    if backend == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        return cluster.url
    server: RedisProcess = request.getfixturevalue("redis_server")
    client = server.client()
    client.flushall()
    client.close()
    return server.url


@pytest.fixture(params=BACKENDS)
def storage_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty storage URL: embedded, a flushed real redis-server, or a flushed Cluster."""
    return fresh_storage(request, request.param)


@pytest.fixture(params=["redis", "cluster"])
def shared_storage(request: pytest.FixtureRequest) -> str:
    """A flushed real Redis or Cluster: storage that several processes can share."""
    return fresh_storage(request, request.param)


class Clock:
    """A controllable clock: epoch seconds, moved by tests."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    """A clock fixed at 2027-01-15T08:00:00Z until a test moves it."""
    return Clock()


def with_storage(config: dict[str, Any], url: str) -> dict[str, Any]:
    """Return the config with `storage.url` set (a copy)."""
    out = dict(config)
    out["storage"] = {**config.get("storage", {}), "url": url, "timeout_ms": 2000}
    return out


@pytest.fixture
def make_meter(storage_url: str, clock: Clock) -> Iterator[Callable[..., Any]]:
    """Build Meters on the test's backend with the test's clock; closes them afterwards."""
    from metergate import Meter

    made: list[Meter] = []

    def make(config: dict[str, Any], **kwargs: Any) -> Meter:
        meter = Meter(with_storage(config, storage_url), clock=kwargs.pop("clock", clock), **kwargs)
        made.append(meter)
        return meter

    yield make
    for meter in made:
        meter.close()


class RedisCluster:
    """A real Redis Cluster of three primaries (optionally with a replica each) on free ports."""

    def __init__(self, workdir: Path, replicas: int = 0) -> None:
        self.replicas = replicas
        self.nodes = [
            RedisProcess(
                workdir / f"node{i}",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{i}.conf",
                "--cluster-node-timeout",
                "1000",
            )
            for i in range(3 * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli is not installed")
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        for node in self.nodes:
            client = node.client()
            while client.cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not become ready")
                time.sleep(0.05)
            client.close()

    def flush(self) -> None:
        for node in self.nodes[:3]:
            client = node.client()
            with contextlib.suppress(redis.ResponseError):  # a replica refuses writes
                client.flushall()
            client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real three-primary Redis Cluster for the whole test session."""
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@dataclass
class ServeProcess:
    """A running `metergate serve`: its proxy and admin URLs, its process and its output file."""

    proxy: str
    admin: str
    proc: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def serve_process(
    config_path: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    start_s: float = 30.0,
) -> Iterator[ServeProcess]:
    """Run `metergate serve --config <config_path> <args>` on free ports in a subprocess until the
    block ends (SIGINT, then SIGKILL after 20 s); its output goes to `<config_path>.log`."""
    log = config_path.with_suffix(".log")
    port, admin_port = free_port(), free_port()
    command = [sys.executable, "-m", "metergate", "serve", "--config", str(config_path)]
    command += ["--port", str(port), "--admin-port", str(admin_port), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + start_s
        for listening in (admin_port, port):
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", listening), timeout=0.2):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"metergate serve did not start:\n{log.read_text()}"
                        ) from None
                    time.sleep(0.05)
        yield ServeProcess(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", proc, log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
