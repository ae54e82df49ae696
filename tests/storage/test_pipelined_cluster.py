"""The pipelined Redis Cluster client on a real Cluster: routing by slot, scripts, MOVED and ASK
during a slot migration done here, a paused primary, a primary failover, concurrency and closing."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from redis.crc import key_slot
from tests.faults.conftest import node_of, primaries, start_cluster

from conftest import RedisCluster, RedisProcess, free_port
from metergate import StorageUnavailable
from metergate.storage.cluster import PipelinedCluster, first_key
from metergate.storage.pipelined import RedisReplyError

pytestmark = pytest.mark.redis

T = TypeVar("T")

TIMEOUT = 2.0
PARTITIONS = 64
SCRIPT = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], n)
return n
"""

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra on POSIX
    uvloop = None

LOOPS = [
    "asyncio",
    pytest.param("uvloop", marks=pytest.mark.skipif(uvloop is None, reason="uvloop")),
]


def run(coro: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    """Run a coroutine on a fresh event loop of the given kind."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        assert uvloop is not None
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def tag(partition: int) -> str:
    """The hash tag of a partition, as the key builder writes it."""
    return f"{{mg:p{partition}}}"


def startup(cluster: RedisCluster) -> list[tuple[str, int]]:
    return [("127.0.0.1", node.port) for node in cluster.nodes[:3]]


def address(node: RedisProcess) -> str:
    return f"127.0.0.1:{node.port}"


def command(node: RedisProcess, *args: Any) -> Any:
    client = node.client()
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def connections(node: RedisProcess, *commands: str) -> int:
    """How many connections to the node last ran one of `commands` (CLIENT LIST's `cmd`): tells
    the client's connections apart from the test's own, which run other commands."""
    client = node.client()
    try:
        return sum(1 for entry in client.client_list() if entry["cmd"] in commands)
    finally:
        client.close()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll until `condition` holds (the servers notice closed connections asynchronously)."""
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextmanager
def paused(node: RedisProcess) -> Iterator[None]:
    """SIGSTOP the node for the block; SIGCONT it whatever happens."""
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)


def other_primary(cluster: RedisCluster, than: RedisProcess) -> RedisProcess:
    return next(node for node in primaries(cluster) if node.port != than.port)


def begin_migration(slot: int, source: RedisProcess, target: RedisProcess) -> None:
    """Mark `slot` IMPORTING on the target and MIGRATING on the source (resharding step 1)."""
    command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", command(source, "CLUSTER", "MYID"))
    command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", command(target, "CLUSTER", "MYID"))


def migrate_keys(source: RedisProcess, target: RedisProcess, *keys: str) -> None:
    command(source, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)


def finish_migration(
    cluster: RedisCluster, slot: int, source: RedisProcess, target: RedisProcess
) -> None:
    """Move the slot's remaining keys and assign it to the target on every primary."""
    keys = command(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
    if keys:
        migrate_keys(source, target, *keys)
    target_id = command(target, "CLUSTER", "MYID")
    others = [n for n in primaries(cluster) if n.port not in (source.port, target.port)]
    for node in (target, source, *others):
        command(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)


def move_slot(cluster: RedisCluster, slot: int, source: RedisProcess, target: RedisProcess) -> None:
    begin_migration(slot, source, target)
    finish_migration(cluster, slot, source, target)


def read_asking(node: RedisProcess, key: str) -> Any:
    """GET on a node importing the key's slot (ASKING first, on the same connection)."""
    client = redis.Redis(port=node.port, decode_responses=True, single_connection_client=True)
    try:
        client.execute_command("ASKING")
        return client.get(key)
    finally:
        client.close()


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Cluster of this module alone (three primaries), whose slots the tests move around."""
    started = start_cluster(tmp_path_factory.mktemp("pipelined-cluster"), replicas=0)
    yield started
    started.stop()


@pytest.fixture
def cluster(own_cluster: RedisCluster) -> RedisCluster:
    for node in primaries(own_cluster):
        command(node, "FLUSHALL")
        command(node, "SCRIPT", "FLUSH")
    return own_cluster


def test_first_key_of_commands() -> None:
    """Calls are routed by args[1], by args[3] for scripts, and commands without keys by none."""
    assert first_key(("INCR", "{mg:p1}:n")) == "{mg:p1}:n"
    assert first_key(("EVALSHA", "sha", "2", "{mg:p2}:a", "{mg:p2}:b", "7")) == "{mg:p2}:a"
    assert first_key((b"evalsha", b"sha", b"1", b"k")) == b"k"
    assert first_key(("EVALSHA", "sha", "0", "arg")) is None
    assert first_key(("SCRIPT", "LOAD", "return 1")) is None
    assert first_key(("PING",)) is None


def test_every_partition_is_routed_to_its_slot_on_one_connection_per_primary(
    cluster: RedisCluster,
) -> None:
    """Keys of all 64 partitions land on the primary serving their slot, through exactly one
    connection to each primary."""

    async def main() -> None:
        client = PipelinedCluster(startup(cluster))
        try:
            for p in range(PARTITIONS):
                assert (
                    await client.call("INCRBY", f"{tag(p)}:n", str(p + 1), timeout=TIMEOUT) == p + 1
                )
            assert sorted(client.primaries) == sorted(address(n) for n in primaries(cluster))
            for node in primaries(cluster):
                assert connections(node, "incrby", "cluster|slots") == 1
        finally:
            await client.aclose()

    run(main())
    served = set()
    for p in range(PARTITIONS):
        key = f"{tag(p)}:n"
        owner = node_of(cluster, key)
        served.add(owner.port)
        assert command(owner, "GET", key) == str(p + 1)
    assert sum(command(node, "DBSIZE") for node in primaries(cluster)) == PARTITIONS
    assert len(served) == 3  # the 64 partitions spread over every primary


def test_evalsha_of_a_script_touching_one_slot(cluster: RedisCluster) -> None:
    """SCRIPT LOAD reaches every primary; EVALSHA of a two-key script runs on each partition's
    node; NOSCRIPT and script errors come back as error replies."""

    async def main() -> None:
        client = PipelinedCluster(startup(cluster))
        try:
            sha = await client.call("SCRIPT", "LOAD", SCRIPT, timeout=TIMEOUT)
            for node in primaries(cluster):
                assert command(node, "SCRIPT", "EXISTS", sha) == [1]
            for round_ in (1, 2):
                replies = await asyncio.gather(
                    *(
                        client.call(
                            "EVALSHA",
                            sha,
                            "2",
                            f"{tag(p)}:a",
                            f"{tag(p)}:b",
                            str(p),
                            timeout=TIMEOUT,
                        )
                        for p in range(PARTITIONS)
                    )
                )
                assert replies == [p * round_ for p in range(PARTITIONS)]
            with pytest.raises(RedisReplyError, match="NOSCRIPT"):
                await client.call("EVALSHA", "0" * 40, "1", f"{tag(3)}:a", timeout=TIMEOUT)
            with pytest.raises(RedisReplyError, match="not an integer"):
                await client.call(
                    "EVALSHA", sha, "2", f"{tag(3)}:a", f"{tag(3)}:b", "x", timeout=TIMEOUT
                )
        finally:
            await client.aclose()

    run(main())
    for p in range(PARTITIONS):
        assert command(node_of(cluster, f"{tag(p)}:b"), "GET", f"{tag(p)}:b") == str(2 * p)


def test_a_moved_slot_is_followed_and_its_call_runs_once(cluster: RedisCluster) -> None:
    """After a slot migrated to another primary, the client's next call gets MOVED, is sent to the
    new owner and runs there once; the client's map then names the new owner."""
    key = f"{tag(5)}:moved"
    slot = key_slot(key.encode())
    source = node_of(cluster, key)
    target = other_primary(cluster, source)

    async def main() -> None:
        client = PipelinedCluster(startup(cluster))
        try:
            assert await client.call("INCR", key, timeout=TIMEOUT) == 1
            assert client.owner(slot) == address(source)
            move_slot(cluster, slot, source, target)
            try:
                assert await client.call("INCR", key, timeout=TIMEOUT) == 2
                assert client.owner(slot) == address(target)
                for p in range(PARTITIONS):  # every other partition still reachable
                    await client.call("INCR", f"{tag(p)}:other", timeout=TIMEOUT)
            finally:
                move_slot(cluster, slot, target, source)
            assert await client.call("INCR", key, timeout=TIMEOUT) == 3
            assert client.owner(slot) == address(source)
        finally:
            await client.aclose()

    run(main())
    assert command(source, "GET", key) == "3"
    assert command(target, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0


@pytest.mark.parametrize("loop", LOOPS)
def test_ask_during_a_half_migrated_slot(cluster: RedisCluster, loop: str) -> None:
    """While a slot migrates, keys already moved are reached with ASKING on the target (also among
    many concurrent calls on the target's shared connection), keys still on the source are served
    there, and a script over keys on both sides gets TRYAGAIN until its budget runs out, with
    nothing run; once the migration ends, the script runs on the new owner."""
    moved, stayed = f"{tag(9)}:moved", f"{tag(9)}:stayed"
    slot = key_slot(moved.encode())
    source = node_of(cluster, moved)
    target = other_primary(cluster, source)
    elsewhere = next(  # a key the target serves itself
        f"{tag(p)}:busy"
        for p in range(PARTITIONS)
        if node_of(cluster, f"{tag(p)}:busy").port == target.port
    )

    async def main() -> None:
        client = PipelinedCluster(startup(cluster))
        try:
            sha = await client.call("SCRIPT", "LOAD", SCRIPT, timeout=TIMEOUT)
            assert await client.call("INCR", moved, timeout=TIMEOUT) == 1
            assert await client.call("INCR", stayed, timeout=TIMEOUT) == 1
            begin_migration(slot, source, target)
            try:
                migrate_keys(source, target, moved)
                assert await client.call("INCR", moved, timeout=TIMEOUT) == 2
                assert await client.call("INCR", stayed, timeout=TIMEOUT) == 2
                # a key that exists nowhere yet is created on the importing node
                assert await client.call("INCR", f"{tag(9)}:new", timeout=TIMEOUT) == 1
                replies = await asyncio.gather(
                    *(
                        client.call("INCR", moved if i % 2 else elsewhere, timeout=TIMEOUT)
                        for i in range(400)
                    )
                )
                assert max(r for i, r in enumerate(replies) if i % 2) == 202
                assert max(r for i, r in enumerate(replies) if not i % 2) == 200
                # ASK leaves the map alone: the slot is still the source's
                assert client.owner(slot) == address(source)
                with pytest.raises(StorageUnavailable, match=r"TRYAGAIN.*nothing ran"):
                    await client.call("EVALSHA", sha, "2", stayed, moved, "10", timeout=0.3)
                assert read_asking(target, moved) == "202"
                assert command(source, "GET", stayed) == "2"
            finally:
                finish_migration(cluster, slot, source, target)
            assert (
                await client.call("EVALSHA", sha, "2", stayed, moved, "10", timeout=TIMEOUT) == 12
            )
            assert client.owner(slot) == address(target)
        finally:
            await client.aclose()

    try:
        run(main(), loop)
    finally:
        if node_of(cluster, moved).port != source.port:
            move_slot(cluster, slot, target, source)
    assert command(source, "GET", moved) == "12"
    assert command(source, "GET", stayed) == "12"


def test_a_call_to_a_paused_primary_is_not_sent_twice(cluster: RedisCluster) -> None:
    """A call without a reply within its timeout raises StorageUnavailable and is never re-sent:
    after the primary resumes, the key was incremented at most once; calls to other primaries go
    on, and the next call to the resumed primary succeeds."""
    key = f"{tag(11)}:paused"
    node = node_of(cluster, key)
    elsewhere = next(
        f"{tag(p)}:n"
        for p in range(PARTITIONS)
        if node_of(cluster, f"{tag(p)}:n").port != node.port
    )

    async def main() -> None:
        client = PipelinedCluster(startup(cluster))
        try:
            assert await client.call("INCR", key, timeout=TIMEOUT) == 1
            with paused(node):
                with pytest.raises(StorageUnavailable, match="outcome is unknown"):
                    await client.call("INCR", key, timeout=0.2)
                assert await client.call("INCR", elsewhere, timeout=TIMEOUT) == 1
            for _ in range(50):  # the resumed node may still be catching up
                try:
                    value = await client.call("GET", key, timeout=TIMEOUT)
                    break
                except StorageUnavailable:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the resumed primary did not answer")
            assert value in ("1", "2")
            assert await client.call("INCR", key, timeout=TIMEOUT) == int(value) + 1
        finally:
            await client.aclose()

    run(main())


def test_reading_the_slot_map_counts_against_the_call_timeout(cluster: RedisCluster) -> None:
    """A call whose only startup node is paused raises StorageUnavailable when its own timeout
    runs out while the slot map is still being read, saying that nothing ran."""
    node = cluster.nodes[0]

    async def main() -> None:
        # the map read's own limit (connect_timeout_s) is longer than the call's budget
        client = PipelinedCluster([("127.0.0.1", node.port)], connect_timeout_s=5.0)
        try:
            with paused(node), pytest.raises(StorageUnavailable, match="in time; nothing ran"):
                await client.call("INCR", f"{tag(1)}:n", timeout=0.2)
            assert await client.call("INCR", f"{tag(1)}:n", timeout=TIMEOUT) == 1
        finally:
            await client.aclose()

    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_thousand_concurrent_calls_from_64_tasks_count_exactly(
    cluster: RedisCluster, loop: str
) -> None:
    """1,000 INCRs from 64 tasks over every partition all succeed, each counted once."""

    async def main() -> None:
        client = PipelinedCluster(startup(cluster))
        counts = [0] * PARTITIONS

        async def worker(first: int) -> None:
            for i in range(first, 1000, 64):
                await client.call("INCR", f"{tag(i % PARTITIONS)}:calls", timeout=TIMEOUT)
                counts[i % PARTITIONS] += 1

        try:
            await asyncio.gather(*(worker(t) for t in range(64)))
            values = await asyncio.gather(
                *(client.call("GET", f"{tag(p)}:calls", timeout=TIMEOUT) for p in range(PARTITIONS))
            )
            assert [int(v) for v in values] == counts
            assert sum(counts) == 1000
        finally:
            await client.aclose()

    run(main(), loop)


def test_aclose_closes_every_node_connection(cluster: RedisCluster) -> None:
    """aclose fails the calls in flight with StorageUnavailable (never a wrong reply) and closes the
    connection to every primary; a later call connects again."""

    def closed() -> bool:
        return all(connections(n, "get", "set", "cluster|slots") == 0 for n in primaries(cluster))

    async def main() -> None:
        client = PipelinedCluster(startup(cluster))
        for p in range(PARTITIONS):
            await client.call("SET", f"{tag(p)}:v", str(p), timeout=TIMEOUT)
        in_flight = [
            asyncio.ensure_future(client.call("GET", f"{tag(p)}:v", timeout=TIMEOUT))
            for p in range(PARTITIONS)
        ]
        await asyncio.sleep(0)  # let them write their requests
        await client.aclose()
        outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
        for p, outcome in enumerate(outcomes):
            assert outcome == str(p) or isinstance(outcome, StorageUnavailable), outcome
        assert any(isinstance(o, StorageUnavailable) for o in outcomes)
        wait_for(closed, "the connections to close")
        assert await client.call("GET", f"{tag(7)}:v", timeout=TIMEOUT) == "7"
        await client.aclose()

    run(main())
    wait_for(closed, "the connections to close")


def test_no_reachable_startup_node_fails_cleanly() -> None:
    """Without a node to read the slot map from, a call raises StorageUnavailable (nothing ran)."""

    async def main() -> None:
        client = PipelinedCluster([("127.0.0.1", free_port())], connect_timeout_s=0.5)
        try:
            with pytest.raises(StorageUnavailable, match="CLUSTER SLOTS"):
                await client.call("INCR", "{mg:p1}:n", timeout=TIMEOUT)
        finally:
            await client.aclose()

    run(main())


def _replicated(node: RedisProcess) -> None:
    """Wait until the primary's replica has everything it wrote."""
    client = node.client()
    try:

        def caught_up() -> bool:
            info = client.info("replication")
            replica = info.get("slave0", {})
            return bool(replica) and int(replica["offset"]) == int(info["master_repl_offset"])

        wait_for(caught_up, "the replica to catch up")
    finally:
        client.close()


def test_a_primary_failover_fails_calls_cleanly_and_runs_each_once(tmp_path: Path) -> None:
    """While a killed primary's replica takes over, calls to its slots succeed or raise
    StorageUnavailable; afterwards they succeed on the promoted replica without a new client, and
    no call ever ran twice."""
    cluster = start_cluster(tmp_path / "failover", replicas=1)
    try:
        key = f"{tag(17)}:log"
        victim = node_of(cluster, key)

        async def main() -> tuple[list[int], list[int]]:
            client = PipelinedCluster(startup(cluster), connect_timeout_s=0.5)
            succeeded: list[int] = []
            failed: list[int] = []
            try:
                for i in range(10):
                    await client.call("RPUSH", key, str(i), timeout=TIMEOUT)
                    succeeded.append(i)
                _replicated(victim)
                victim.stop()
                deadline = time.monotonic() + 30
                n = 10
                while time.monotonic() < deadline:
                    batch = list(range(n, n + 16))
                    n += 16
                    outcomes = await asyncio.gather(
                        *(client.call("RPUSH", key, str(i), timeout=0.5) for i in batch),
                        return_exceptions=True,
                    )
                    for i, outcome in zip(batch, outcomes, strict=True):
                        if isinstance(outcome, BaseException):
                            assert isinstance(outcome, StorageUnavailable), outcome
                            failed.append(i)
                        else:
                            succeeded.append(i)
                    if not any(isinstance(o, BaseException) for o in outcomes):
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("no promotion within 30 s")
                assert failed, "the outage should have failed some calls"
                assert client.owner(key_slot(key.encode())) != address(victim)
                return succeeded, failed
            finally:
                await client.aclose()

        succeeded, failed = run(main())
        promoted = node_of(cluster, key)
        assert promoted.port != victim.port
        pushed = [int(v) for v in command(promoted, "LRANGE", key, 0, -1)]
        assert len(pushed) == len(set(pushed)), "a call ran twice"
        assert set(succeeded) <= set(pushed)
        assert set(pushed) <= set(succeeded) | set(failed)
    finally:
        cluster.stop()
