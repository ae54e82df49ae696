"""The embedded backend's compiled-script cache answers exactly as plain fakeredis does."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from metergate import AsyncMeter, Meter
from metergate.storage import embedded
from metergate.storage.drivers import AsyncStorage, SyncStorage
from metergate.storage.scripts import load_script


def _url() -> str:
    return f"memory://embedded-{uuid.uuid4().hex}"


@pytest.fixture
def clients() -> Iterator[tuple[redis.Redis, redis.Redis]]:
    """A plain fakeredis client and an embedded one, each on a server of its own."""
    plain = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    cached = embedded.open_memory_sync(_url())
    yield plain, cached
    plain.close()
    cached.close()


def _comparable(reply: Any) -> Any:
    """A reply with the errors nested in it (redis-py returns them as exceptions) as text."""
    if isinstance(reply, list):
        return [_comparable(item) for item in reply]
    if isinstance(reply, Exception):
        return (type(reply).__name__, str(reply))
    return reply


def _outcome(call: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """`call(*args)`'s reply, or the type and message of the error it raised."""
    try:
        return "reply", _comparable(call(*args))
    except redis.RedisError as exc:
        return type(exc).__name__, str(exc)


# With a fakeredis release the overrides were not checked against, the embedded backend is plain
# fakeredis (same answers, slower): the cache's own tests are skipped, saying so. To enable it,
# compare fakeredis's ScriptingCommandsMixin.eval/_lua_redis_call, BaseFakeSocket's
# _parse_commands and the connections' _connect with the copies in embedded.py, then add the
# release to VERIFIED_FAKEREDIS.
needs_cache = pytest.mark.skipif(
    not embedded.CACHES_SCRIPTS,
    reason=f"fakeredis {fakeredis.__version__} is not one the script cache was checked against",
)


@needs_cache
def test_scripts_are_cached_on_this_fakeredis() -> None:
    """The installed fakeredis is one the overrides were checked against."""
    assert fakeredis.__version__.startswith(embedded.VERIFIED_FAKEREDIS)


# (script, numkeys, keys and args); every case runs after `SET s x` on both servers.
CASES: list[tuple[str, int, tuple[Any, ...]]] = [
    ("return {KEYS[1], ARGV[1], 3, 3.7, -2.5, true, false, {1, {'x'}}, nil, 9}", 1, ("k", "a")),
    ("return redis.call('SET', KEYS[1], ARGV[1])", 1, ("k", "v")),
    ("redis.call('SET', KEYS[1], ARGV[1]) return redis.call('GET', KEYS[1])", 1, ("k", "v")),
    ("return redis.call('GET', 'missing')", 0, ()),
    ("return redis.call('HSET', KEYS[1], 'f', 1.5, 'g', 7)", 1, ("h",)),
    ("redis.call('HSET', KEYS[1], 'f', 2) return redis.call('HGETALL', KEYS[1])", 1, ("h",)),
    ("return redis.call('INCRBYFLOAT', KEYS[1], '0.5')", 1, ("f",)),
    ("return redis.status_reply('FINE')", 0, ()),
    ("return redis.error_reply('ERR invalid amount: must be positive')", 0, ()),
    ("return {redis.error_reply('nested')}", 0, ()),
    ("redis.call('SET', 's', 'x') return redis.call('INCR', 's')", 0, ()),
    ("redis.call('SET', 's', 'x') return redis.pcall('INCR', 's')", 0, ()),
    ("return redis.call('SET', KEYS[1], {})", 1, ("k",)),
    ("return redis.call('NOSUCHCOMMAND')", 0, ()),
    ("return redis.call('EVAL', 'return 1', 0)", 0, ()),
    ("return redis.call('CONFIG', 'GET', 'maxmemory-policy')", 0, ()),
    ("error('boom')", 0, ()),
    ("error({err = 'table error'})", 0, ()),
    ("local t = nil return t.field", 0, ()),
    ("return cjson.encode({a = {1, 2}, b = ARGV[1]})", 0, ("x",)),
    ("return cjson.decode(ARGV[1]).a", 0, ('{"a": [1, 2]}',)),
    ("redis.setresp(3) return redis.call('HGETALL', 'nothing')", 0, ()),
    ("return #KEYS + 10 * #ARGV", 2, ("k1", "k2", "a1", "a2", "a3")),
    ("return 1 +", 0, ()),
    ("return 1", 3, ("only", "two")),
    ("return 1", -1, ()),
]


@pytest.mark.parametrize(("script", "numkeys", "keys_and_args"), CASES)
def test_eval_and_evalsha_answer_as_plain_fakeredis(
    clients: tuple[redis.Redis, redis.Redis],
    script: str,
    numkeys: int,
    keys_and_args: tuple[Any, ...],
) -> None:
    """EVAL, then EVALSHA twice (compiled, then from the cache): replies and error replies (with
    the script's SHA1 in them) are plain fakeredis's, call after call."""
    plain, cached = clients
    sha = hashlib.sha1(script.encode()).hexdigest()
    for client in clients:
        client.set("s", "x")
    for command, script_or_sha in (("eval", script), ("evalsha", sha), ("evalsha", sha)):
        expected = _outcome(getattr(plain, command), script_or_sha, numkeys, *keys_and_args)
        assert (
            _outcome(getattr(cached, command), script_or_sha, numkeys, *keys_and_args) == expected
        )
    assert plain.keys() == cached.keys()


def test_pipelines_and_transactions_answer_as_plain_fakeredis(
    clients: tuple[redis.Redis, redis.Redis],
) -> None:
    """Script calls queued in MULTI/EXEC, failing ones included, and many in one pipeline (several
    requests per chunk for the parser) answer as on plain fakeredis."""

    def run(client: redis.Redis) -> list[Any]:
        sha = client.script_load("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        transaction = client.pipeline(transaction=True)
        transaction.evalsha(sha, 1, "n", 2)
        transaction.evalsha(sha, 1, "n", "x")
        transaction.eval("return 1 +", 0)
        transaction.evalsha(sha, 1, "n", 3)
        pipeline = client.pipeline(transaction=False)
        for i in range(200):
            pipeline.evalsha(sha, 1, "m", i)
        return [
            _comparable(transaction.execute(raise_on_error=False)),
            pipeline.execute()[-3:],
        ]

    plain, cached = clients
    assert run(cached) == run(plain)


@needs_cache
def test_a_script_is_compiled_once_and_run_with_fresh_keys_and_args() -> None:
    """Calls of one script reuse one compiled function, each seeing only its own KEYS and ARGV,
    and chunk-level locals start over on every call."""
    url = _url()
    client = embedded.open_memory_sync(url)
    script = (
        "local seen = {} seen[#seen + 1] = ARGV[1] or '-'\n"
        "return {#seen, #KEYS, #ARGV, KEYS[1] or '-', ARGV[1] or '-'}"
    )
    sha = client.script_load(script)
    assert client.evalsha(sha, 1, "k1", "a") == [1, 1, 1, "k1", "a"]
    compiled = embedded.memory_server(url).compiled_scripts
    assert compiled is not None and len(compiled) == 1
    assert client.evalsha(sha, 1, "k2", "b", "c") == [1, 1, 2, "k2", "b"]
    assert client.evalsha(sha, 0) == [1, 0, 0, "-", "-"]
    assert len(compiled) == 1
    client.close()


def test_a_script_cannot_pass_its_environment_on_to_the_next_call(
    clients: tuple[redis.Redis, redis.Redis],
) -> None:
    """A script that swaps its own environment (setfenv) keeps nothing of it for the next call:
    the compiled function gets the globals back before every run, as a freshly loaded one has."""
    script = (
        "setfenv(1, {ARGV = ARGV, tostring = tostring})\n"
        "seen = (seen or 0) + 1\n"
        "return tostring(seen) .. ARGV[1]"
    )
    for client in clients:
        sha = client.script_load(script)
        assert [client.evalsha(sha, 0, arg) for arg in ("a", "b", "c")] == ["1a", "1b", "1c"]


def test_a_new_global_fails_as_in_plain_fakeredis(clients: tuple[redis.Redis, redis.Redis]) -> None:
    """Creating a global fails the script, whether found before a `redis.call` or after the
    script; fakeredis leaves the global in place, so every later script on that server fails too,
    with the same message."""
    for script in ("leak = 1 return redis.call('PING')", "return 1", "local x = 1 return x"):
        assert _outcome(clients[1].eval, script, 0) == _outcome(clients[0].eval, script, 0)
    assert "leak" in _outcome(clients[1].eval, "return 2", 0)[1]


@needs_cache
def test_script_flush_drops_compiled_scripts_and_answers_noscript() -> None:
    """SCRIPT FLUSH, from an embedded client or a plain fakeredis one on the same server, drops
    the compiled scripts with the sources: EVALSHA answers NOSCRIPT until the script is loaded
    again."""
    url = _url()
    server = embedded.memory_server(url)
    client = embedded.open_memory_sync(url)
    plain = fakeredis.FakeRedis(server=server, decode_responses=True)
    sha = client.script_load("return ARGV[1]")
    assert client.evalsha(sha, 0, "x") == "x"
    compiled = server.compiled_scripts
    assert compiled is not None and len(compiled) == 1

    client.script_flush()
    assert len(compiled) == 0
    with pytest.raises(redis.exceptions.NoScriptError):
        client.evalsha(sha, 0, "x")

    assert client.script_load("return ARGV[1]") == sha
    assert client.evalsha(sha, 0, "y") == "y"
    plain.script_flush()
    with pytest.raises(redis.exceptions.NoScriptError):
        client.evalsha(sha, 0, "x")
    client.script_load("return ARGV[1]")
    assert client.evalsha(sha, 0, "z") == "z"
    assert len(compiled) == 1
    client.close()
    plain.close()


def test_a_script_error_is_an_error_every_time(clients: tuple[redis.Redis, redis.Redis]) -> None:
    """A script failing at run time fails again on the next call (nothing half-done is kept), and
    a well-behaved script run between the failures is unaffected."""
    plain, cached = clients
    failing = "redis.call('SET', KEYS[1], 'x') return redis.call('INCR', KEYS[1])"
    for client in clients:
        client.script_load(failing)
    sha = hashlib.sha1(failing.encode()).hexdigest()
    for _ in range(2):
        expected = _outcome(plain.evalsha, sha, 1, "k")
        assert expected[0] == "ResponseError"
        assert _outcome(cached.evalsha, sha, 1, "k") == expected
        assert cached.eval("return ARGV[1]", 0, "fine") == "fine"


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
            replies = [await client.evalsha(sha, 1, "n", 3), await client.get("n")]
            await client.script_flush()
            return replies
        finally:
            await client.aclose()

    assert asyncio.run(use_async()) == [5, "5"]
    with pytest.raises(redis.exceptions.NoScriptError):
        sync.evalsha(sha, 1, "n", 1)
    assert sync.get("n") == "5"
    sync.close()


@needs_cache
def test_admissions_decide_as_on_plain_fakeredis() -> None:
    """metergate's own scripts, run by Meter and AsyncMeter, decide and count exactly as on plain
    fakeredis, refusals and their reasons included."""
    config = {
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

    def decisions(client: Any) -> list[Any]:
        with Meter(config, storage=SyncStorage(client), clock=lambda: 1_800_000_000.0) as meter:
            return [meter.admit("c", {"calls": 2}) for _ in range(4)]

    plain = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    url = _url()
    assert decisions(embedded.open_memory_sync(url)) == decisions(plain)

    async def more() -> Any:
        meter = AsyncMeter(config, storage=AsyncStorage(embedded.open_memory_async(url)))
        try:
            return await meter.admit("c", {"calls": 1})
        finally:
            await meter.aclose()

    decision = asyncio.run(more())
    assert decision.allowed and decision.assets["calls"].value == 5
    server = embedded.memory_server(url)
    assert load_script("admit").sha.encode() in server.script_cache
    assert server.compiled_scripts is not None and len(server.compiled_scripts) >= 1


# Requests as a client sends them, and ones fakeredis's parser refuses or reads oddly.
_REQUEST = st.lists(st.binary(max_size=12), min_size=1, max_size=5).map(
    lambda args: b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
)
_ODD = st.sampled_from(
    [
        b"*0\r\n",
        b"*-1\r\n",
        b"*1\r\n$-1\r\nabc\r\n",
        b"*1\r\n$3\nabc\r\n",
        b"*1\r\n$x\r\nabc\r\n",
        b"*1\n",
        b"PING\r\n",
        b"*1\r\n:3\r\n",
        b"*2\r\n$3\r\na\r\n\r\n$1\r\nb\r\n",
        b"*1\r\n$3\r\nabcXY",
        b"* 1\r\n$ 2\r\nab\r\n",
    ]
)


def _parse(socket: Any, chunks: list[bytes]) -> list[Any]:
    """Feed chunks to a socket's request parser: what it handed on, and how it stopped."""
    seen: list[Any] = []
    socket._process_command = lambda fields: seen.append(("command", fields))
    for chunk in chunks:
        try:
            socket._parser.send(chunk)
        except Exception as exc:
            seen.append((type(exc).__name__, str(exc)))
            break
    return seen


@settings(max_examples=300, deadline=None)
@given(
    requests=st.lists(st.one_of(_REQUEST, _REQUEST, _ODD), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_request_parser_reads_as_fakeredis_does(requests: list[bytes], cuts: list[int]) -> None:
    """The request parser hands on the same commands and fails with the same error as fakeredis's,
    however the bytes are cut into chunks."""
    stream = b"".join(requests)
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    server = fakeredis.FakeServer()
    plain = fakeredis._socket.FakeSocket(server, 0, client_class=redis.Redis)
    cached = embedded._EmbeddedSocket(server, 0, client_class=redis.Redis)
    assert _parse(cached, chunks) == _parse(plain, chunks)
