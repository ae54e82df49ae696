"""Sync and async drivers over redis-py clients (for `memory://`, ones of the embedded server).

A mutating script is never retried blindly: redis-py's own retries are switched off (on plain
clients, on Cluster clients, sync and asyncio), and the only second attempt is after NOSCRIPT,
which Redis answers without running anything. Every way storage can fail surfaces as
StorageUnavailable (whose message says whether the outcome is unknown or nothing was written);
a script's own validation error surfaces as InvalidAmount.

On the first call, a driver reads `maxmemory-policy` (every primary of a Cluster) and refuses to
work (`storage.eviction: refuse`, the default) or logs a warning (`warn`) when Redis could evict
keys: an evicted balance would read as missing, an evicted idempotency record would let a retry
charge twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlparse

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    MaxConnectionsError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)
from redis.retry import Retry

from metergate.config import StorageConfig
from metergate.core.errors import InvalidAmount, StorageUnavailable
from metergate.core.flows import Batch, Command, Script
from metergate.storage.blocking import BlockingClient
from metergate.storage.cluster import PipelinedCluster
from metergate.storage.pipelined import PipelinedConnection, RedisReplyError
from metergate.storage.replies import reply_error
from metergate.storage.scripts import load_script

__all__ = ["AsyncStorage", "SyncStorage", "UnsafeStorage", "open_async", "open_sync"]

# An error reply of the lean blocking client becomes what redis-py raises for it (the same class,
# the same message), so that `_error` maps both clients' errors alike.
_reply_error: Callable[[str], Exception] = reply_error

logger = logging.getLogger("metergate")

# RedisClusterException: the Cluster client could not reach any startup node ("Redis Cluster
# cannot be connected"), or found no node for a slot (SlotNotCoveredError, a subclass).
_NETWORK_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError, RedisClusterException)
# Error replies meaning "this Redis cannot serve the command right now"; none of them ran it.
_STATE_ERRORS = (OutOfMemoryError, ReadOnlyError, ClusterDownError, TryAgainError, ClusterError)
_STATE_CODES = frozenset(
    {"OOM", "READONLY", "CLUSTERDOWN", "MASTERDOWN", "TRYAGAIN", "LOADING", "BUSY", "MISCONF",
     "NOREPLICAS", "MOVED", "ASK"}
)  # fmt: skip
# Commands that may be sent twice: reads, and writes whose repetition changes nothing more. The
# asyncio pool hands out a connection the server closed meanwhile (a restart) without noticing,
# and the command then fails with "Connection closed by server"; these are sent once more.
_RESENDABLE = frozenset(
    {"GET", "MGET", "HGET", "HMGET", "HGETALL", "HKEYS", "HEXISTS", "EXISTS", "TYPE", "TTL",
     "PTTL", "LRANGE", "LLEN", "XRANGE", "XREVRANGE", "XLEN", "SMEMBERS", "SISMEMBER", "SCARD",
     "ZRANGE", "ZRANGEBYSCORE", "ZSCORE", "ZCARD", "PING", "SADD", "SREM", "HSET", "HDEL"}
)  # fmt: skip


def _resendable(commands: tuple[tuple[str, ...], ...], exc: Exception) -> bool:
    if isinstance(exc, MaxConnectionsError) or str(exc).startswith("No connection available"):
        return False  # the pool is exhausted: waiting for it twice would only double the delay
    return all(
        args[0].upper() in _RESENDABLE
        or (args[0].upper() == "SET" and "NX" in (a.upper() for a in args[3:]))
        for args in commands
    )


# Calls in flight at once on the asyncio Cluster client (each holds one connection to a node);
# its per-node pools get twice that, leaving room for the worker's direct use of the client.
CLUSTER_IN_FLIGHT = 64

OOM_MESSAGE = (
    "Redis is out of memory (maxmemory reached, noeviction): nothing was written; "
    "free memory or raise maxmemory"
)


class UnsafeStorage(StorageUnavailable):
    """Redis is configured so that it may lose metering data (an evicting maxmemory-policy)."""


def _code(exc: Exception) -> str:
    """The error code of a Redis error reply (redis-py strips it from mapped exceptions)."""
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code:
        return code
    if isinstance(exc, OutOfMemoryError):
        return "OOM"
    if isinstance(exc, ReadOnlyError):
        return "READONLY"
    if isinstance(exc, TryAgainError):
        return "TRYAGAIN"
    if isinstance(exc, ClusterDownError):
        return "CLUSTERDOWN"
    return str(exc).split(" ", 1)[0]


def _error(exc: Exception) -> Exception:
    """Map an error reply: a script's validation error (`ERR invalid <field>: <why>`) becomes
    InvalidAmount; a Redis state that refused the command becomes StorageUnavailable."""
    code = _code(exc)
    if code == "OOM":
        return StorageUnavailable(OOM_MESSAGE)
    if code in _STATE_CODES or isinstance(exc, _STATE_ERRORS):
        return StorageUnavailable(f"Redis refused the command (nothing ran): {code} {exc}")
    text = str(exc)
    marker = text.find("invalid ")
    if marker >= 0 and ": " in text[marker:]:
        field, _, why = text[marker + len("invalid ") :].partition(": ")
        return InvalidAmount(field.strip(), why.strip())
    return exc


def _unsafe_policies(replies: Mapping[str, Any]) -> dict[str, str]:
    """From CONFIG GET replies (one node's, or {node: reply} of a Cluster), the evicting ones."""
    if "maxmemory-policy" in replies:
        replies = {"": replies}
    out = {}
    for node, reply in replies.items():
        policy = str(reply.get("maxmemory-policy", "")) if isinstance(reply, Mapping) else ""
        if policy != "noeviction":
            out[node] = policy or "unknown"
    return out


def _judge(replies: Mapping[str, Any] | Exception, mode: str) -> None:
    """Refuse or warn about an evicting maxmemory-policy; warn when it cannot be read."""
    if isinstance(replies, Exception):
        logger.warning(
            "metergate: cannot read Redis maxmemory-policy (%s); make sure it is 'noeviction', "
            "or balances, counters and idempotency records may be evicted",
            replies,
        )
        return
    unsafe = _unsafe_policies(replies)
    if not unsafe:
        return
    where = ", ".join(f"{node or 'redis'}: {policy}" for node, policy in sorted(unsafe.items()))
    message = (
        f"Redis maxmemory-policy is not 'noeviction' ({where}): under memory pressure Redis "
        "would evict balances, counters or idempotency records (a retry could then charge "
        "twice). Set `maxmemory-policy noeviction`"
    )
    if mode == "refuse":
        raise UnsafeStorage(message + ", or storage.eviction: warn to run anyway")
    logger.error("metergate: %s (storage.eviction: warn, running anyway)", message)


def _sync_options(config: StorageConfig) -> dict[str, Any]:
    timeout = config.timeout_ms / 1000
    return {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": max(timeout, 1.0),
        "retry": Retry(NoBackoff(), 0),
    }


def _async_options(config: StorageConfig) -> dict[str, Any]:
    options = _sync_options(config)
    options["retry"] = redis.asyncio.retry.Retry(NoBackoff(), 0)
    return options


class SyncStorage:
    """Runs calls on a blocking client; script calls on the lean blocking client when given one."""

    def __init__(
        self,
        client: Any,
        blocking: BlockingClient | None = None,
        *,
        eviction: str | None = None,
        cluster: bool = False,
    ) -> None:
        self.client = client
        self.blocking = blocking
        self.eviction = eviction
        self.cluster = cluster
        self._checked = eviction is None
        self._check_lock = threading.Lock()

    def _check(self) -> None:
        with self._check_lock:
            if self._checked:
                return
            try:
                if self.cluster:
                    replies = self.client.config_get(
                        "maxmemory-policy", target_nodes=self.client.PRIMARIES
                    )
                else:
                    replies = self.client.config_get("maxmemory-policy")
            except redis.ResponseError as exc:  # CONFIG renamed away, or not allowed by ACL
                replies = exc
            _judge(replies, str(self.eviction))
            self._checked = True

    def _script(self, call: Script) -> Any:
        script = load_script(call.name)
        try:
            return self.client.evalsha(script.sha, len(call.keys), *call.keys, *call.args)
        except NoScriptError:
            # NOSCRIPT: nothing ran, so loading and running once more cannot double-apply.
            self.client.script_load(script.source)
            return self.client.evalsha(script.sha, len(call.keys), *call.keys, *call.args)

    @staticmethod
    def _blocking_script(call: Script, conn: BlockingClient) -> Any:
        script = load_script(call.name)
        args: tuple[str | int, ...] = (
            "EVALSHA",
            script.sha,
            len(call.keys),
            *call.keys,
            *call.args,
        )
        try:
            return conn.call(*args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise _reply_error(str(exc)) from None
        # NOSCRIPT: nothing ran, so loading and running once more cannot double-apply.
        try:
            conn.call("SCRIPT", "LOAD", script.source)
            return conn.call(*args)
        except RedisReplyError as exc:
            raise _reply_error(str(exc)) from None

    def _commands(self, call: Command | Batch) -> Any:
        if isinstance(call, Command):
            return self.client.execute_command(*call.args)
        pipe = self.client.pipeline(transaction=False)
        for args in call.commands:
            pipe.execute_command(*args)
        return list(pipe.execute())

    def run(self, call: Script | Command | Batch) -> Any:
        """Run one script call, command or batch of commands and return its reply."""
        try:
            if not self._checked:
                self._check()
            if isinstance(call, Script):
                if self.blocking is not None:
                    return self._blocking_script(call, self.blocking)
                return self._script(call)
            commands = (call.args,) if isinstance(call, Command) else call.commands
            try:
                return self._commands(call)
            except redis.ConnectionError as exc:
                if not _resendable(commands, exc):
                    raise
                return self._commands(call)
        except StorageUnavailable:
            raise
        except redis.ResponseError as exc:
            raise _error(exc) from None
        except (*_NETWORK_ERRORS, ClusterError) as exc:
            raise StorageUnavailable(str(exc) or type(exc).__name__) from exc

    def close(self) -> None:
        """Close the connections."""
        if self.blocking is not None:
            self.blocking.close()
        self.client.close()


class AsyncStorage:
    """Runs calls on an asyncio client; script calls on the pipelined connection when given one."""

    def __init__(
        self,
        client: Any,
        pipelined: PipelinedConnection | PipelinedCluster | None = None,
        timeout_s: float = 1.0,
        *,
        eviction: str | None = None,
        cluster: bool = False,
        max_in_flight: int | None = None,
    ) -> None:
        self.client = client
        self.pipelined = pipelined
        self.timeout_s = timeout_s
        self.eviction = eviction
        self.cluster = cluster
        self._checked = eviction is None
        # The asyncio Cluster client fails a call at once (MaxConnectionsError) when a node's
        # pool is exhausted: calls beyond `max_in_flight` wait here instead, for a bounded time.
        self._gate = asyncio.Semaphore(max_in_flight) if max_in_flight else None

    async def start(self) -> None:
        """Open the hot path's connections ahead of the first call (a Cluster's slot map too),
        so that no request's budget pays for them. Best effort: a node that cannot be reached
        now is connected to, or reported, by the call that needs it."""
        if self.pipelined is not None:
            with contextlib.suppress(StorageUnavailable):
                await self.pipelined.connect(None)  # bounded by its own connect timeout

    async def _check(self) -> None:
        # Tasks racing through the first call may each read the policy once: harmless.
        try:
            if self.cluster:
                replies = await self.client.config_get(
                    "maxmemory-policy", target_nodes=self.client.PRIMARIES
                )
            else:
                replies = await self.client.config_get("maxmemory-policy")
        except redis.ResponseError as exc:  # CONFIG renamed away, or not allowed by ACL
            replies = exc
        if not self._checked:
            _judge(replies, str(self.eviction))
            self._checked = True

    async def _pipelined_script(
        self, call: Script, conn: PipelinedConnection | PipelinedCluster
    ) -> Any:
        script = load_script(call.name)
        args = ("EVALSHA", script.sha, str(len(call.keys)), *call.keys, *call.args)
        try:
            return await conn.call(*args, timeout=self.timeout_s)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise redis.ResponseError(str(exc)) from None
        # NOSCRIPT: nothing ran, so loading and running once more cannot double-apply.
        try:
            await conn.call("SCRIPT", "LOAD", script.source, timeout=self.timeout_s)
            return await conn.call(*args, timeout=self.timeout_s)
        except RedisReplyError as exc:
            raise redis.ResponseError(str(exc)) from None

    async def _script(self, call: Script) -> Any:
        script = load_script(call.name)
        try:
            return await self.client.evalsha(script.sha, len(call.keys), *call.keys, *call.args)
        except NoScriptError:
            await self.client.script_load(script.source)
            return await self.client.evalsha(script.sha, len(call.keys), *call.keys, *call.args)

    async def _commands(self, call: Command | Batch) -> Any:
        if isinstance(call, Command):
            return await self.client.execute_command(*call.args)
        pipe = self.client.pipeline(transaction=False)
        for args in call.commands:
            pipe.execute_command(*args)
        return list(await pipe.execute())

    async def run(self, call: Script | Command | Batch) -> Any:
        """Run one script call, command or batch of commands and return its reply."""
        if self._gate is None or (self.pipelined is not None and isinstance(call, Script)):
            # Script calls on the pipelined client take no pooled connection: nothing to wait for.
            return await self._run(call)
        try:
            async with asyncio.timeout(max(self.timeout_s, 1.0)):
                await self._gate.acquire()
        except TimeoutError:
            raise StorageUnavailable("too many storage calls in flight; nothing was sent") from None
        try:
            return await self._run(call)
        finally:
            self._gate.release()

    async def _run(self, call: Script | Command | Batch) -> Any:
        try:
            if not self._checked:
                await self._check()
            if isinstance(call, Script):
                if self.pipelined is not None:
                    return await self._pipelined_script(call, self.pipelined)
                return await self._script(call)
            commands = (call.args,) if isinstance(call, Command) else call.commands
            try:
                return await self._commands(call)
            except redis.ConnectionError as exc:
                if not _resendable(commands, exc):
                    raise
                return await self._commands(call)
        except StorageUnavailable:
            raise
        except redis.ResponseError as exc:
            raise _error(exc) from None
        except TimeoutError as exc:
            raise StorageUnavailable("storage did not answer in time; outcome unknown") from exc
        except (*_NETWORK_ERRORS, ClusterError) as exc:
            raise StorageUnavailable(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        """Close the connections."""
        if self.pipelined is not None:
            await self.pipelined.aclose()
        await self.client.aclose()
        # A client built on a pool it was given does not close that pool's connections itself.
        pool = getattr(self.client, "connection_pool", None)
        if pool is not None and not self.cluster:
            await pool.disconnect()


def _cluster_nodes(url: str) -> list[tuple[str, int]]:
    """Parse `redis+cluster://host:port[,host:port...]` into startup nodes."""
    nodes = []
    for part in url.removeprefix("redis+cluster://").split("/")[0].split(","):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"storage.url: '{part}' is not host:port in {url!r}")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def open_sync(config: StorageConfig) -> SyncStorage:
    """Open a blocking driver for `storage.url`."""
    url = config.url
    if url.startswith("memory://"):
        from metergate.storage.embedded import open_memory_sync

        return SyncStorage(open_memory_sync(url))
    if url.startswith("redis://") and not urlparse(url).query:
        # Script calls (the hot path) on lean connections, everything else on redis-py.
        timeout = config.timeout_ms / 1000
        return SyncStorage(
            redis.Redis.from_url(url, **_sync_options(config)),
            BlockingClient(url, timeout_s=timeout, connect_timeout_s=max(timeout, 1.0)),
            eviction=config.eviction,
        )
    if url.startswith(("redis://", "rediss://", "unix://")):
        return SyncStorage(
            redis.Redis.from_url(url, **_sync_options(config)), eviction=config.eviction
        )
    if url.startswith("redis+cluster://"):
        from redis.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode(h, p) for h, p in _cluster_nodes(url)]  # type: ignore[no-untyped-call]
        # `retry` here is the Cluster client's own retry (the per-node clients never retry).
        cluster = RedisCluster(startup_nodes=nodes, **_sync_options(config))
        return SyncStorage(cluster, eviction=config.eviction, cluster=True)
    raise ValueError(f"storage.url: unsupported scheme in {url!r}")


def open_async(config: StorageConfig) -> AsyncStorage:
    """Open an asyncio driver for `storage.url`."""
    url = config.url
    timeout = config.timeout_ms / 1000
    if url.startswith("memory://"):
        from metergate.storage.embedded import open_memory_async

        return AsyncStorage(open_memory_async(url))
    if url.startswith(("redis://", "rediss://")):
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=max(timeout, 1.0), **_async_options(config)
        )
        return AsyncStorage(
            redis.asyncio.Redis(connection_pool=pool),
            PipelinedConnection(url, connect_timeout_s=max(timeout, 1.0)),
            timeout_s=timeout,
            eviction=config.eviction,
        )
    if url.startswith("unix://"):
        unix = redis.asyncio.Redis.from_url(url, **_async_options(config))
        return AsyncStorage(unix, timeout_s=timeout, eviction=config.eviction)
    if url.startswith("redis+cluster://"):
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode(h, p) for h, p in _cluster_nodes(url)]
        # The asyncio Cluster client retries TimeoutError and ConnectionError (re-sending the
        # command after re-reading the topology) as often as its `retry` allows: zero here.
        # MOVED, ASK and TRYAGAIN are still followed, as Redis ran nothing for them.
        cluster = RedisCluster(
            startup_nodes=nodes, max_connections=2 * CLUSTER_IN_FLIGHT, **_async_options(config)
        )
        # Script calls (the hot path) on one pipelined connection per primary, routed by slot;
        # everything else on redis-py's Cluster client.
        return AsyncStorage(
            cluster,
            PipelinedCluster(_cluster_nodes(url), connect_timeout_s=max(timeout, 1.0)),
            timeout_s=timeout,
            eviction=config.eviction,
            cluster=True,
            max_in_flight=CLUSTER_IN_FLIGHT,
        )
    raise ValueError(f"storage.url: unsupported scheme in {url!r}")
