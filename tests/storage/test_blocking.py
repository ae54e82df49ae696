"""The lean blocking client of the hot path: threads, timeouts, restarts, scripts, error replies."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from tests.storage.credits import config

from conftest import RedisProcess, with_storage
from metergate import InvalidAmount, Meter, StorageUnavailable
from metergate.config import StorageConfig
from metergate.core.flows import Command, Script
from metergate.storage import SyncStorage, open_sync
from metergate.storage import drivers as drivers_module
from metergate.storage.blocking import BlockingClient, RedisReplyError
from metergate.storage.scripts import LuaScript

pytestmark = pytest.mark.redis

TIMEOUT_S = 0.2


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone, which it may pause or restart."""
    server = RedisProcess(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def flushed(redis_server: RedisProcess) -> RedisProcess:
    """The session's redis-server, emptied (data and scripts)."""
    client = redis_server.client()
    client.flushall()
    client.script_flush()
    client.close()
    return redis_server


@contextmanager
def paused(server: RedisProcess) -> Iterator[None]:
    """SIGSTOP the server for the block; SIGCONT it whatever happens."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


@contextmanager
def blocking(url: str, timeout_s: float = 2.0) -> Iterator[BlockingClient]:
    client = BlockingClient(url, timeout_s=timeout_s)
    try:
        yield client
    finally:
        client.close()


def test_replies_come_back_as_redis_py_decodes_them(flushed: RedisProcess) -> None:
    """Strings, integers, nil, arrays and nested arrays, as redis-py with decode_responses."""
    with blocking(flushed.url) as client:
        assert client.call("SET", "k", "välue") == "OK"
        assert client.call("GET", "k") == "välue"
        assert client.call("GET", "missing") is None
        assert client.call("INCRBY", "n", 41) == 41
        assert client.call("RPUSH", "l", "a", b"b") == 2
        assert client.call("LRANGE", "l", 0, -1) == ["a", "b"]
        script = "return {1, 'two', {3, 'four'}, redis.call('GET', KEYS[1])}"
        assert client.call("EVAL", script, 1, "k") == [1, "two", [3, "four"], "välue"]


def test_many_threads_share_the_client_and_each_gets_its_own_replies(
    flushed: RedisProcess,
) -> None:
    """Sixteen threads calling at once each read the replies to their own commands, and every
    command ran exactly once."""
    threads, calls = 16, 200
    wrong: list[tuple[str, Any]] = []
    with blocking(flushed.url) as client:

        def work(t: int) -> None:
            for i in range(calls):
                mine = f"t{t}-{i}"
                echoed = client.call("ECHO", mine)
                if echoed != mine:
                    wrong.append((mine, echoed))
                counted = client.call("INCR", f"count:{t}")
                if counted != i + 1:
                    wrong.append((f"count:{t}", counted))

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert wrong == []
        assert (
            client.call("MGET", *(f"count:{t}" for t in range(threads))) == [str(calls)] * threads
        )
        # connections are reused: never more of them than threads calling at once
        names = [line for line in client.call("CLIENT", "LIST").splitlines() if "cmd=" in line]
        assert len(names) <= threads + 1


def test_a_call_to_a_paused_redis_times_out_and_its_socket_is_closed(
    own_redis: RedisProcess,
) -> None:
    """A call without a reply within the timeout raises StorageUnavailable ("outcome unknown")
    and is not sent again; after SIGCONT the next call gets its own reply on a new connection,
    so the late reply was never read."""
    with blocking(own_redis.url, timeout_s=TIMEOUT_S) as client:
        first_id = client.call("CLIENT", "ID")
        with paused(own_redis), pytest.raises(StorageUnavailable, match="outcome is unknown"):
            client.call("INCR", "late")
        assert client.call("ECHO", "mine") == "mine"
        assert client.call("CLIENT", "ID") != first_id
        # the INCR ran once, when Redis resumed: it was sent once and never retried
        assert client.call("GET", "late") == "1"


def test_calls_in_threads_to_a_paused_redis_all_fail_and_the_client_recovers(
    own_redis: RedisProcess,
) -> None:
    """Every thread calling a stopped Redis gets StorageUnavailable; after SIGCONT every thread
    gets its own replies again."""
    threads = 8
    with blocking(own_redis.url, timeout_s=TIMEOUT_S) as client:
        client.call("PING")
        outcomes: list[Any] = [None] * threads

        def attempt(t: int) -> None:
            try:
                outcomes[t] = client.call("ECHO", f"during-{t}")
            except StorageUnavailable as exc:
                outcomes[t] = exc

        with paused(own_redis):
            workers = [threading.Thread(target=attempt, args=(t,)) for t in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        assert all(isinstance(o, StorageUnavailable) for o in outcomes)
        for t in range(threads):
            assert client.call("ECHO", f"after-{t}") == f"after-{t}"


def test_the_client_reconnects_after_a_restart_without_failing_a_call(
    own_redis: RedisProcess,
) -> None:
    """A connection Redis closed while it was idle is not used: the first call after a restart
    succeeds; while Redis is down, calls fail with StorageUnavailable (nothing was sent)."""
    with blocking(own_redis.url) as client:
        assert client.call("PING") == "PONG"
        own_redis.stop()
        with pytest.raises(StorageUnavailable, match="cannot connect"):
            client.call("PING")
        own_redis.start()
        assert client.call("ECHO", "back") == "back"
        own_redis.stop()
        own_redis.start()
        assert client.call("SET", "k", "v") == "OK"  # restarted under an idle connection


def test_a_connection_killed_by_redis_while_idle_is_replaced(flushed: RedisProcess) -> None:
    """CLIENT KILL (or Redis's idle `timeout`) closes an idle connection: the next call opens
    another one instead of sending into the closed one."""
    with blocking(flushed.url) as client:
        victim = client.call("CLIENT", "ID")
        admin = flushed.client()
        try:
            assert admin.client_kill_filter(_id=victim) == 1
        finally:
            admin.close()
        assert client.call("ECHO", "fresh") == "fresh"
        assert client.call("CLIENT", "ID") != victim


def test_error_replies_raise_and_keep_the_connection(flushed: RedisProcess) -> None:
    """An error reply raises RedisReplyError with Redis's text; the connection stays in use."""
    with blocking(flushed.url) as client:
        client.call("SET", "s", "text")
        conn_id = client.call("CLIENT", "ID")
        with pytest.raises(RedisReplyError, match=r"^ERR value is not an integer"):
            client.call("INCR", "s")
        with pytest.raises(RedisReplyError, match=r"^WRONGTYPE"):
            client.call("LPUSH", "s", "x")
        with pytest.raises(RedisReplyError, match=r"^NOSCRIPT"):
            client.call("EVALSHA", "0" * 40, 0)
        assert client.call("CLIENT", "ID") == conn_id


def test_a_large_reply_in_many_pieces_is_read_whole(flushed: RedisProcess) -> None:
    """A reply bigger than one receive is assembled across receives, and the connection serves
    the next call normally."""
    big = "x" * 3_000_000
    with blocking(flushed.url, timeout_s=TIMEOUT_S) as client:
        client.call("SET", "big", big)
        assert client.call("GET", "big") == big
        assert client.call("ECHO", "next") == "next"


def test_auth_and_database_come_from_the_url(own_redis: RedisProcess) -> None:
    """`redis://user:password@host:port/db` authenticates and selects the database on every
    connection; a wrong password is StorageUnavailable."""
    admin = own_redis.client()
    try:
        admin.acl_setuser(
            "meter", enabled=True, passwords=["+us3r/pw"], keys=["*"], commands=["+@all"]
        )
        admin.config_set("requirepass", "s3cret/pass")  # the default user's password
        base = f"127.0.0.1:{own_redis.port}"
        with blocking(f"redis://:s3cret%2Fpass@{base}/3") as client:
            assert client.call("SET", "where", "db3") == "OK"
        with blocking(f"redis://meter:us3r%2Fpw@{base}/3") as client:
            assert client.call("GET", "where") == "db3"
            assert client.call("ACL", "WHOAMI") == "meter"
        check = redis.Redis(
            port=own_redis.port, password="s3cret/pass", db=3, decode_responses=True
        )
        try:
            assert check.get("where") == "db3"
        finally:
            check.close()
        with blocking(f"redis://:wrong@{base}/0") as client, pytest.raises(StorageUnavailable):
            client.call("PING")
    finally:
        admin.close()


def test_close_closes_the_connections_and_a_later_call_reconnects(flushed: RedisProcess) -> None:
    """close() closes the idle connections; a call after it opens a new one."""
    with blocking(flushed.url) as client:
        before = client.call("CLIENT", "ID")
        client.close()
        assert client.call("CLIENT", "ID") != before


FORK_CHECK = """
import os, sys
from metergate.storage.blocking import BlockingClient

client = BlockingClient(sys.argv[1], timeout_s=2.0)
parent_id = client.call("CLIENT", "ID")
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    code = 1
    try:
        os.write(write, str(client.call("CLIENT", "ID")).encode())
        code = 0
    finally:
        os._exit(code)
os.close(write)
child_id = int(os.read(read, 64) or b"0")
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert child_id not in (0, parent_id), (child_id, parent_id)
assert client.call("CLIENT", "ID") == parent_id
client.close()
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_opens_its_own_connections(flushed: RedisProcess) -> None:
    """After a fork, the child never reads from the parent's connection: it opens its own, and
    the parent's connection keeps serving the parent. (In a process of its own: this one has
    threads, and forking it is not safe.)"""
    done = subprocess.run(
        [sys.executable, "-c", FORK_CHECK, flushed.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# -- through SyncStorage ----------------------------------------------------------------------


def _storage_config(url: str) -> StorageConfig:
    return StorageConfig.model_validate({"url": url, "timeout_ms": 2000})


def test_open_sync_puts_script_calls_of_plain_redis_urls_on_the_lean_client(
    redis_server: RedisProcess,
) -> None:
    """redis:// gets the lean client for scripts; rediss://, unix:// and URLs with options stay
    on redis-py alone."""
    lean = open_sync(_storage_config(redis_server.url))
    try:
        assert isinstance(lean.blocking, BlockingClient)
    finally:
        lean.close()
    for url in (
        f"{redis_server.url}?health_check_interval=5",
        "rediss://127.0.0.1:1/0",
        "unix:///nonexistent/redis.sock",
    ):
        storage = open_sync(_storage_config(url))
        try:
            assert storage.blocking is None
        finally:
            storage.close()


def _pair(url: str) -> tuple[SyncStorage, SyncStorage]:
    """The same Redis through redis-py alone and through the lean client."""
    config = _storage_config(url)
    lean = open_sync(config)
    plain = SyncStorage(redis.Redis.from_url(url, **drivers_module._sync_options(config)))
    return plain, lean


@pytest.mark.parametrize(
    "body",
    [
        "return redis.error_reply('ERR invalid amount: must be an integer')",
        "return redis.error_reply('OOM command not allowed when used memory > maxmemory')",
        "return redis.error_reply('READONLY You cannot write against a read only replica')",
        "return redis.error_reply('BUSY Redis is busy running a script')",
        "return redis.error_reply('ERR something else went wrong')",
        "return redis.error_reply('WRONGTYPE Operation against a key holding the wrong kind')",
        "return redis.call('INCR', KEYS[1])",
    ],
)
def test_script_errors_map_as_they_do_on_redis_py(
    flushed: RedisProcess, monkeypatch: pytest.MonkeyPatch, body: str
) -> None:
    """Every error reply of a script surfaces as the same exception, with the same message, on
    the lean client as on redis-py (InvalidAmount, StorageUnavailable, ResponseError)."""
    script = LuaScript("probe", body, hashlib.sha1(body.encode()).hexdigest())
    monkeypatch.setattr(drivers_module, "load_script", lambda name: script)
    client = flushed.client()
    client.set("text", "not a number")
    client.close()
    plain, lean = _pair(flushed.url)
    outcomes: list[tuple[type[BaseException], str]] = []
    try:
        for storage in (plain, lean):
            with pytest.raises(Exception) as info:
                storage.run(Script("probe", ("text",), ()))
            outcomes.append((type(info.value), str(info.value)))
    finally:
        plain.close()
        lean.close()
    assert outcomes[0] == outcomes[1]
    assert outcomes[1][0] in (InvalidAmount, StorageUnavailable, redis.ResponseError)


def test_noscript_after_script_flush_loads_the_script_and_runs_it_once(
    flushed: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After SCRIPT FLUSH, EVALSHA answers NOSCRIPT (nothing ran): the script is loaded and run
    once more, and its effect is applied once."""
    body = "return redis.call('INCR', KEYS[1])"
    script = LuaScript("probe", body, hashlib.sha1(body.encode()).hexdigest())
    monkeypatch.setattr(drivers_module, "load_script", lambda name: script)
    _, lean = _pair(flushed.url)
    admin = flushed.client()
    try:
        assert lean.run(Script("probe", ("n",), ())) == 1
        admin.script_flush()
        assert lean.run(Script("probe", ("n",), ())) == 2
        assert admin.get("n") == "2"
        assert lean.run(Command(("GET", "n"))) == "2"  # plain commands stay on redis-py
    finally:
        admin.close()
        lean.close()


def test_a_meter_admits_through_the_lean_client_after_a_script_flush(
    flushed: RedisProcess,
) -> None:
    """Admissions of a Meter on redis:// run on the lean client, survive a SCRIPT FLUSH and are
    counted once each."""
    spec = with_storage(config(amount=10), flushed.url)
    with Meter(spec) as meter:
        assert meter.storage.blocking is not None
        assert meter.admit("c", {"calls": 1}, "one").allowed
        admin = flushed.client()
        try:
            admin.script_flush()
        finally:
            admin.close()
        decision = meter.admit("c", {"calls": 2}, "two")
        assert decision.allowed and decision.assets["calls"].value == 3
        assert meter.admit("c", {"calls": 2}, "two").assets["calls"].value == 3  # a replay
        assert meter.balance("c", "credits").amount == 10 - 3
