"""The embedded backend answers as Redis does: scripts, errors, commands, and its script cache."""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from conftest import RedisProcess
from metergate import AsyncMeter, Meter
from metergate.storage import embedded
from metergate.storage.drivers import AsyncStorage, SyncStorage
from metergate.storage.scripts import load_script


def _url() -> str:
    return f"memory://embedded-{uuid.uuid4().hex}"


@pytest.fixture
def clients(redis_server: RedisProcess) -> Iterator[tuple[redis.Redis, redis.Redis]]:
    """A client of a flushed real Redis (its scripts flushed too) and one of a new embedded server,
    both speaking RESP2 (the embedded client's protocol) so that raw replies compare."""
    real = redis.Redis(port=redis_server.port, decode_responses=True, protocol=2)
    real.flushall()
    real.script_flush()
    mine = embedded.open_memory_sync(_url())
    yield real, mine
    real.close()
    mine.close()


def _comparable(reply: Any) -> Any:
    """A reply with the errors nested in it (redis-py returns them as exceptions) as text."""
    if isinstance(reply, list):
        return [_comparable(item) for item in reply]
    if isinstance(reply, dict):
        return {k: _comparable(v) for k, v in reply.items()}
    if isinstance(reply, Exception):
        return (type(reply).__name__, str(reply))
    return reply


def _outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """`call(*args)`'s reply, or the type and message of the error it raised."""
    try:
        return "reply", _comparable(call(*args, **kwargs))
    except redis.RedisError as exc:
        return type(exc).__name__, str(exc)


# (script, numkeys, keys and args); every case runs after `SET s x` on both servers.
CASES: list[tuple[str, int, tuple[Any, ...]]] = [
    ("return {KEYS[1], ARGV[1], 3, 3.7, -2.5, true, false, {1, {'x'}}, nil, 9}", 1, ("k", "a")),
    ("return redis.call('SET', KEYS[1], ARGV[1])", 1, ("k", "v")),
    ("redis.call('SET', KEYS[1], ARGV[1]) return redis.call('GET', KEYS[1])", 1, ("k", "v")),
    ("return redis.call('GET', 'missing')", 0, ()),
    ("return type(redis.call('GET', 'missing'))", 0, ()),
    ("return type(redis.call('SET', 'k', 'v'))", 0, ()),
    ("return redis.call('HSET', KEYS[1], 'f', 1.5, 'g', 7)", 1, ("h",)),
    ("redis.call('HSET', KEYS[1], 'f', 2) return redis.call('HGETALL', KEYS[1])", 1, ("h",)),
    ("redis.call('SET', 'n', 1e20) return redis.call('GET', 'n')", 0, ()),
    ("redis.call('SET', 'n', 2^53 + 2) return redis.call('GET', 'n')", 0, ()),
    ("return redis.call('INCRBYFLOAT', KEYS[1], '0.5')", 1, ("f",)),
    ("return redis.status_reply('FINE')", 0, ()),
    ("return redis.error_reply('ERR invalid amount: must be positive')", 0, ()),
    ("return redis.error_reply('boom')", 0, ()),
    ("return redis.error_reply('-BOOM x')", 0, ()),
    ("return {redis.error_reply('nested')}", 0, ()),
    ("redis.call('SET', 's', 'x') return redis.call('INCR', 's')", 0, ()),
    ("redis.call('SET', 's', 'x') return redis.pcall('INCR', 's')", 0, ()),
    ("local r = redis.pcall('INCR', 's') return type(r) .. r.err", 0, ()),
    ("return redis.call('HGET', 's', 'f')", 0, ()),
    ("return redis.call('SET', KEYS[1], {})", 1, ("k",)),
    ("return redis.call('NOSUCHCOMMAND')", 0, ()),
    ("return redis.call('GET')", 0, ()),
    ("return redis.call()", 0, ()),
    ("return redis.call('EVAL', 'return 1', 0)", 0, ()),
    ("error('boom')", 0, ()),
    ("error({err = 'table error'})", 0, ()),
    ("local t = nil\nreturn t.field", 0, ()),
    ("return undefined_name", 0, ()),
    ("leak = 1 return 1", 0, ()),
    ("function f() end return 1", 0, ()),
    ("return cjson.encode({a = {1, 2}, b = ARGV[1]})", 0, ("x/y",)),
    ("return cjson.encode({ARGV[1], 1800000000000, 0.5, true})", 0, ('q"\\\n',)),
    ("return cjson.decode(ARGV[1]).a", 0, ('{"a": [1, 2]}',)),
    ("return redis.sha1hex(ARGV[1])", 0, ("abc",)),
    ("return #KEYS + 10 * #ARGV", 2, ("k1", "k2", "a1", "a2", "a3")),
    ("return 1 +", 0, ()),
    ("return 1", 3, ("only", "two")),
    ("return 1", -1, ()),
    ("return tostring(2^53) .. ' ' .. tostring(0.1)", 0, ()),
    ("return type(python)", 0, ()),
    ("return {type(rawget(_G, 'os')), type(rawget(_G, 'setfenv')), type(coroutine)}", 0, ()),
    ("return loadstring('return type(redis)')()", 0, ()),
    ("return loadstring('return python')()", 0, ()),
    ("return {string.format('%d', 7), math.floor(2.5), table.concat({'a', 'b'}, ',')}", 0, ()),
]


@pytest.mark.parametrize(("script", "numkeys", "keys_and_args"), CASES)
def test_eval_and_evalsha_answer_as_redis(
    clients: tuple[redis.Redis, redis.Redis],
    script: str,
    numkeys: int,
    keys_and_args: tuple[Any, ...],
) -> None:
    """EVAL, then EVALSHA twice: replies and error replies (with the script's SHA1 and line in
    them, as the same redis-py exception) are a real Redis's, call after call, and so are the
    keys left behind."""
    real, mine = clients
    sha = hashlib.sha1(script.encode()).hexdigest()
    for client in clients:
        client.set("s", "x")
    for command, script_or_sha in (("eval", script), ("evalsha", sha), ("evalsha", sha)):
        expected = _outcome(getattr(real, command), script_or_sha, numkeys, *keys_and_args)
        assert _outcome(getattr(mine, command), script_or_sha, numkeys, *keys_and_args) == expected
    assert sorted(real.keys()) == sorted(mine.keys())
    for key in real.keys("*"):
        assert mine.type(key) == real.type(key)


def _commands(client: redis.Redis) -> list[Any]:
    """Commands the drivers, the worker and the scripts send, error cases included; replies."""
    out: list[Any] = []

    def run(*args: Any, **kwargs: Any) -> None:
        name = args[0]
        out.append((name, _outcome(getattr(client, name), *args[1:], **kwargs)))

    def raw(*args: Any) -> None:
        out.append((args[0], _outcome(client.execute_command, *args)))

    run("set", "a", "1", nx=True)
    run("set", "a", "2", nx=True)
    run("get", "a")
    run("set", "e", "v", ex=100)
    run("ttl", "e")
    run("ttl", "a")
    run("ttl", "missing")
    run("incr", "a")
    run("incrby", "a", 5)
    run("hset", "h", mapping={"f": "1", "g": "x"})
    run("hincrby", "h", "f", 2)
    run("hincrby", "h", "g", 1)
    run("hget", "h", "f")
    run("hmget", "h", ["f", "nope", "g"])
    run("hgetall", "h")
    run("hkeys", "h")
    run("hexists", "h", "g")
    run("hdel", "h", "g", "nope")
    run("hgetall", "nothing")
    run("get", "h")
    run("hget", "a", "f")
    raw("HSET", "h", "odd")
    raw("NOSUCHCOMMAND", "x")
    raw("GET")
    run("sadd", "s", "b", "a", "b")
    run("smembers", "s")
    run("sismember", "s", "a")
    run("lpush", "l", "1", "2", "3")
    run("ltrim", "l", 0, 1)
    run("lrange", "l", 0, -1)
    run("zadd", "z", {"m1": 5, "m2": 1, "m3": 3, "m4": 3})
    run("zadd", "z", {"m1": 6}, nx=True)
    run("zadd", "z", {"m1": 7}, xx=True)
    run("zscore", "z", "m1")
    run("zscore", "z", "nope")
    run("zrange", "z", 0, 0, withscores=True)
    run("zrange", "z", 0, -1)
    run("zrangebyscore", "z", "-inf", 3)
    run("zrangebyscore", "z", "(1", "+inf", start=0, num=2)
    run("zrangebyscore", "z", "x", "+inf")
    run("zrem", "z", "m2", "nope")
    run("zremrangebyscore", "z", "-inf", "(4")
    run("zrange", "z", 0, -1, withscores=True)
    run("exists", "a", "z", "missing")
    run("type", "z")
    run("delete", "a", "missing")
    run("expire", "h", 100)
    run("ttl", "h")
    raw("TIME")
    out[-1] = ("TIME", (out[-1][1][0], len(out[-1][1][1])))
    run("config_get", "maxmemory-policy")
    return out


def _streams(client: redis.Redis) -> list[Any]:
    """The stream commands of the worker and its scripts, on fixed ids; replies (an idle time as
    its type)."""
    out: list[Any] = []

    def run(*args: Any, **kwargs: Any) -> None:
        name = args[0]
        out.append((name, _outcome(getattr(client, name), *args[1:], **kwargs)))

    def raw(*args: Any) -> None:
        out.append((args[0], _outcome(client.execute_command, *args)))

    run("xgroup_create", "st", "g", id="0")
    run("xgroup_create", "st", "g", id="0", mkstream=True)
    run("xgroup_create", "st", "g", id="0", mkstream=True)
    for i in range(1, 6):
        run("xadd", "st", {"n": str(i), "k": "v"}, id=f"{i}-0")
    run("xadd", "st", {"n": "0"}, id="1-0")
    run("xlen", "st")
    run("xrange", "st", "2-0", "+", count=2)
    run("xrange", "st", "(2-0", "3")
    run("xrevrange", "st", "+", "-", count=1)
    run("xreadgroup", "g", "c1", {"st": ">"}, count=2)
    run("xreadgroup", "g", "c2", {"st": ">"}, count=1)
    run("xreadgroup", "g", "c1", {"st": "0"})
    run("xreadgroup", "nogroup", "c1", {"st": ">"})
    run("xpending", "st", "g")
    run("xpending", "st", "nogroup")
    for low, high, count in (("-", "+", 10), ("2-0", "2-0", 1)):
        run("xpending_range", "st", "g", low, high, count)
        for row in out[-1][1][1]:
            row["time_since_delivered"] = type(row["time_since_delivered"]).__name__
    run("xclaim", "st", "g", "c3", 0, ["1-0", "9-0"])
    run("xack", "st", "g", "2-0", "9-0")
    run("xautoclaim", "st", "g", "c2", 0, start_id="0-0", count=1)
    run("xautoclaim", "st", "g", "c2", 0, start_id="0-0", count=10)
    run("xdel", "st", "1-0")
    run("xautoclaim", "st", "g", "c3", 0, start_id="0-0", count=10)
    raw("XINFO", "GROUPS", "st")
    run("xinfo_consumers", "st", "g")
    for row in out[-1][1][1]:
        row["idle"] = type(row["idle"]).__name__
    run("xtrim", "st", minid="4-0", approximate=False)
    run("xrange", "st", "-", "+")
    raw("XGROUP", "DELCONSUMER", "st", "g", "c2")
    run("xadd", "dead", {"a": "1"}, id="1-0")
    raw("XADD", "dead", "MAXLEN", "=", "1", "2-0", "b", "2")
    raw("XADD", "dead", "MAXLEN", "1", "3-0", "c", "3")
    run("xrange", "dead", "-", "+")
    run("xadd", "st", {"x": "1"}, id="0-0")
    raw("XRANGE", "st", "bad", "+")
    return out


@pytest.mark.parametrize("sequence", [_commands, _streams])
def test_commands_answer_as_redis(
    clients: tuple[redis.Redis, redis.Redis], sequence: Callable[[redis.Redis], list[Any]]
) -> None:
    """The commands metergate sends outside scripts (strings, hashes, sets, lists, sorted sets,
    streams and consumer groups, expiry, error cases) answer exactly as on a real Redis."""
    real, mine = clients
    expected = sequence(real)
    got = sequence(mine)
    assert [name for name, _ in got] == [name for name, _ in expected]
    for (name, want), (_, have) in zip(expected, got, strict=True):
        assert (name, have) == (name, want)


def test_pipelines_and_transactions_answer_as_redis(
    clients: tuple[redis.Redis, redis.Redis],
) -> None:
    """Script calls queued in a transaction, failing ones included, and many in one pipeline
    answer as on a real Redis."""

    def run(client: redis.Redis) -> list[Any]:
        sha = client.script_load("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        transaction = client.pipeline(transaction=True)
        transaction.evalsha(sha, 1, "n", 2)
        transaction.evalsha(sha, 1, "n", "x")
        transaction.evalsha(sha, 1, "n", 3)
        pipeline = client.pipeline(transaction=False)
        for i in range(200):
            pipeline.evalsha(sha, 1, "m", i)
        pipeline.get("m")
        return [
            _comparable(transaction.execute(raise_on_error=False)),
            pipeline.execute()[-3:],
        ]

    real, mine = clients
    assert run(mine) == run(real)


def test_a_script_is_compiled_once_per_server_and_run_with_fresh_keys_and_args() -> None:
    """Calls of one script reuse the function it compiled to (once per server, whichever client
    loads it), each call seeing only its own KEYS and ARGV, chunk-level locals starting over."""
    url = _url()
    client = embedded.open_memory_sync(url)
    server = embedded.memory_server(url)
    script = (
        "local seen = {} seen[#seen + 1] = ARGV[1] or '-'\n"
        "return {#seen, #KEYS, #ARGV, KEYS[1] or '-', ARGV[1] or '-'}"
    )
    sha = client.script_load(script)
    assert client.evalsha(sha, 1, "k1", "a") == [1, 1, 1, "k1", "a"]
    assert client.evalsha(sha, 1, "k2", "b", "c") == [1, 1, 2, "k2", "b"]
    assert client.eval(script, 0) == [1, 0, 0, "-", "-"]
    assert embedded.open_memory_sync(url).script_load(script) == sha
    assert server.compilations == 1
    other = embedded.open_memory_sync(_url())
    assert other.evalsha(other.script_load(script), 0) == [1, 0, 0, "-", "-"]
    assert server.compilations == 1
    client.close()
    other.close()


def test_a_new_global_fails_and_leaves_nothing_behind(
    clients: tuple[redis.Redis, redis.Redis],
) -> None:
    """Creating a global fails the script with Redis's error, before or after a `redis.call`;
    the global does not exist afterwards, so later scripts on the server run normally."""
    real, mine = clients
    for script in (
        "leak = 1 return redis.call('PING')",
        "redis.call('SET', 'w', '1') leak = 1 return 1",
        "return type(rawget(_G, 'leak'))",
        "return 2",
    ):
        assert _outcome(mine.eval, script, 0) == _outcome(real.eval, script, 0)
    assert mine.eval("return 2", 0) == 2
    assert mine.get("w") == real.get("w") == "1"  # a script is not rolled back on error


@pytest.mark.parametrize(
    "script",
    [
        "return tostring(redis.call.__self__)",
        "return tostring(redis.call['__self__'])",
        "return tostring(getmetatable(redis.call).__index(redis.call, '__self__'))",
        "return tostring(python)",
        "return loadstring('return python')()",
        "return tostring(getfenv)",
        "return tostring(debug)",
    ],
)
def test_a_script_cannot_reach_python_or_the_runtime(script: str) -> None:
    """A script sees only what a Redis script sees: no path from it leads to a Python object's
    attributes (the interpreter), the runtime's own globals, or the debug library."""
    client = embedded.open_memory_sync(_url())
    with pytest.raises(redis.ResponseError, match="script: "):
        client.eval(script, 0)
    assert client.eval("return redis.call('PING')", 0) == "PONG"
    client.close()


def test_script_flush_answers_noscript_until_loaded_again() -> None:
    """SCRIPT FLUSH, from any client of the server, drops the loaded scripts: EVALSHA answers
    NOSCRIPT until the script is loaded (and compiled) again."""
    url = _url()
    server = embedded.memory_server(url)
    client = embedded.open_memory_sync(url)
    other = embedded.open_memory_sync(url)
    sha = client.script_load("return ARGV[1]")
    assert client.evalsha(sha, 0, "x") == "x"
    assert client.script_exists(sha) == [True]

    other.script_flush()
    assert client.script_exists(sha) == [False]
    with pytest.raises(redis.exceptions.NoScriptError, match="No matching script"):
        client.evalsha(sha, 0, "x")
    assert client.script_load("return ARGV[1]") == sha
    assert client.evalsha(sha, 0, "y") == "y"
    assert server.compilations == 2
    client.close()
    other.close()


def test_the_drivers_load_a_flushed_script_again() -> None:
    """After SCRIPT FLUSH the sync and asyncio drivers get NOSCRIPT, load the script and run it
    once: the admission counts exactly once."""
    config = _config()
    url = _url()
    with Meter(config, storage=SyncStorage(embedded.open_memory_sync(url))) as meter:
        assert meter.admit("c", {"calls": 1}).allowed
        embedded.open_memory_sync(url).script_flush()
        assert meter.admit("c", {"calls": 1}).assets["calls"].value == 2

    async def more() -> Any:
        storage = AsyncStorage(embedded.open_memory_async(url))
        meter = AsyncMeter(config, storage=storage)
        try:
            await storage.client.script_flush()
            return await meter.admit("c", {"calls": 1})
        finally:
            await meter.aclose()

    assert asyncio.run(more()).assets["calls"].value == 3


def test_a_script_error_is_an_error_every_time(clients: tuple[redis.Redis, redis.Redis]) -> None:
    """A script failing at run time fails again on the next call with the same error as on a
    real Redis, and a well-behaved script run between the failures is unaffected."""
    real, mine = clients
    failing = "redis.call('SET', KEYS[1], 'x') return redis.call('INCR', KEYS[1])"
    for client in clients:
        client.script_load(failing)
    sha = hashlib.sha1(failing.encode()).hexdigest()
    for _ in range(2):
        expected = _outcome(real.evalsha, sha, 1, "k")
        assert expected[0] == "ResponseError"
        assert _outcome(mine.evalsha, sha, 1, "k") == expected
        assert mine.eval("return ARGV[1]", 0, "fine") == "fine"


def test_sync_and_async_clients_share_one_server_and_its_scripts() -> None:
    """A sync and an asyncio client of one URL see the same keys and the same loaded scripts, and
    a SCRIPT FLUSH from either."""
    url = _url()
    assert embedded.memory_server(url) is embedded.memory_server(url)
    sync = embedded.open_memory_sync(url)
    sha = sync.script_load("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert sync.evalsha(sha, 1, "n", 2) == 2

    async def use_async() -> list[Any]:
        client = embedded.open_memory_async(url)
        try:
            pipe = client.pipeline(transaction=False)
            pipe.get("n")
            pipe.hgetall("nothing")
            replies = [await client.evalsha(sha, 1, "n", 3), await pipe.execute()]
            await client.script_flush()
            return replies
        finally:
            await client.aclose()

    assert asyncio.run(use_async()) == [5, ["5", {}]]
    with pytest.raises(redis.exceptions.NoScriptError):
        sync.evalsha(sha, 1, "n", 1)
    assert sync.get("n") == "5"
    sync.close()


def test_scripts_are_atomic_across_threads() -> None:
    """Read-modify-write scripts from many threads at once lose no update: each script runs
    alone, as on Redis's single thread."""
    url = _url()
    script = (
        "local v = tonumber(redis.call('GET', KEYS[1]) or '0') redis.call('SET', KEYS[1], v + 1)"
    )

    def work() -> None:
        client = embedded.open_memory_sync(url)
        sha = client.script_load(script)
        for _ in range(300):
            client.evalsha(sha, 1, "n")

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert embedded.open_memory_sync(url).get("n") == "1800"


def _config() -> dict[str, Any]:
    return {
        "metrics": {"calls": {"type": "CumulativeCounter"}},
        "plans": {
            "p": {
                "assets": {
                    "calls": {
                        "period": "month",
                        "balance": "credits",
                        "tiers": [
                            {"from": 0, "level": "Normal", "policy": "NotifyOnly"},
                            {"from": 5, "level": "OverUsage", "policy": "Deny"},
                        ],
                    }
                }
            }
        },
        "customers": {"c": {"entitlement": {"plan": "p"}, "balances": {"credits": {}}}},
    }


def test_admissions_decide_as_on_redis(redis_server: RedisProcess) -> None:
    """metergate's own scripts, run by Meter, decide and count exactly as on a real Redis,
    refusals and their reasons included, and leave the same keys with the same contents."""
    config = _config()

    def decisions(client: Any) -> list[Any]:
        with Meter(config, storage=SyncStorage(client), clock=lambda: 1_800_000_000.0) as meter:
            return [meter.admit("c", {"calls": 2}) for _ in range(4)]

    real = redis_server.client()
    real.flushall()
    mine = embedded.open_memory_sync(_url())
    assert decisions(mine) == decisions(real)

    # Each admission's undo record is named by its random attempt id: compare how many there are.
    def named(keys: list[str]) -> tuple[list[str], int]:
        undo = [k for k in keys if re.search(r":op:.*:u:[0-9a-f]+$", k)]
        return sorted(set(keys) - set(undo)), len(undo)

    assert named(mine.keys()) == named(real.keys())
    # each storage chooses its own deployment id, once, which the start-up digest covers
    deployment = {"dep", "cfg"}
    for key in named(real.keys())[0]:
        if real.type(key) == "hash":
            theirs = {k: v for k, v in real.hgetall(key).items() if k not in deployment}
            ours = {k: v for k, v in mine.hgetall(key).items() if k not in deployment}
            assert ours == theirs, key
    assert mine.script_exists(load_script("admit").sha) == [True]
    real.close()
