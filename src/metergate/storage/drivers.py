"""Sync and async drivers over redis-py clients (or fakeredis, which mimics them for `memory://`).

A mutating script is never retried blindly: redis-py's own retries are switched off, and the only
second attempt is after NOSCRIPT, which Redis answers without running anything.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from metergate.config import StorageConfig
from metergate.core.errors import InvalidAmount, StorageUnavailable
from metergate.core.flows import Command, Script
from metergate.storage.pipelined import PipelinedConnection, RedisReplyError
from metergate.storage.scripts import load_script

__all__ = ["AsyncStorage", "SyncStorage", "open_async", "open_sync"]

_NETWORK_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


def _script_error(exc: Exception) -> Exception:
    """Turn a script's own validation error (`ERR invalid <field>: <why>`) into InvalidAmount."""
    text = str(exc)
    marker = text.find("invalid ")
    if marker >= 0 and ": " in text[marker:]:
        field, _, why = text[marker + len("invalid ") :].partition(": ")
        return InvalidAmount(field.strip(), why.strip())
    return exc


_memory_servers: dict[str, Any] = {}
_memory_lock = threading.Lock()


def _memory_server(url: str) -> Any:
    import fakeredis

    with _memory_lock:
        server = _memory_servers.get(url)
        if server is None:
            server = _memory_servers[url] = fakeredis.FakeServer()
        return server


def _client_options(config: StorageConfig) -> dict[str, Any]:
    timeout = config.timeout_ms / 1000
    return {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": max(timeout, 1.0),
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
    }


class SyncStorage:
    """Runs calls on a blocking client."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def run(self, call: Script | Command) -> Any:
        """Run one script call or command and return its reply."""
        try:
            if isinstance(call, Command):
                return self.client.execute_command(*call.args)
            script = load_script(call.name)
            try:
                return self.client.evalsha(script.sha, len(call.keys), *call.keys, *call.args)
            except NoScriptError:
                # NOSCRIPT: nothing ran, so loading and running once more cannot double-apply.
                self.client.script_load(script.source)
                return self.client.evalsha(script.sha, len(call.keys), *call.keys, *call.args)
        except redis.ResponseError as exc:
            raise _script_error(exc) from None
        except _NETWORK_ERRORS as exc:
            raise StorageUnavailable(str(exc) or type(exc).__name__) from exc

    def close(self) -> None:
        """Close the connections."""
        self.client.close()


class AsyncStorage:
    """Runs calls on an asyncio client; script calls on the pipelined connection when given one."""

    def __init__(
        self, client: Any, pipelined: PipelinedConnection | None = None, timeout_s: float = 1.0
    ) -> None:
        self.client = client
        self.pipelined = pipelined
        self.timeout_s = timeout_s

    async def _script(self, call: Script, conn: PipelinedConnection) -> Any:
        script = load_script(call.name)
        args = ("EVALSHA", script.sha, str(len(call.keys)), *call.keys, *call.args)
        try:
            return await asyncio.wait_for(conn.call(*args), self.timeout_s)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise redis.ResponseError(str(exc)) from None
        # NOSCRIPT: nothing ran, so loading and running once more cannot double-apply.
        await asyncio.wait_for(conn.call("SCRIPT", "LOAD", script.source), self.timeout_s)
        return await asyncio.wait_for(conn.call(*args), self.timeout_s)

    async def run(self, call: Script | Command) -> Any:
        """Run one script call or command and return its reply."""
        try:
            if isinstance(call, Script) and self.pipelined is not None:
                return await self._script(call, self.pipelined)
            if isinstance(call, Command):
                return await self.client.execute_command(*call.args)
            script = load_script(call.name)
            try:
                return await self.client.evalsha(script.sha, len(call.keys), *call.keys, *call.args)
            except NoScriptError:
                await self.client.script_load(script.source)
                return await self.client.evalsha(script.sha, len(call.keys), *call.keys, *call.args)
        except redis.ResponseError as exc:
            raise _script_error(exc) from None
        except TimeoutError as exc:
            raise StorageUnavailable("storage did not answer in time; outcome unknown") from exc
        except _NETWORK_ERRORS as exc:
            raise StorageUnavailable(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        """Close the connections."""
        if self.pipelined is not None:
            await self.pipelined.aclose()
        await self.client.aclose()


def _cluster_nodes(url: str) -> list[tuple[str, int]]:
    """Parse `redis+cluster://host:port[,host:port...]` into startup nodes."""
    nodes = []
    for part in url.removeprefix("redis+cluster://").split("/")[0].split(","):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"storage.url: '{part}' is not host:port in {url!r}")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def _cluster_options(config: StorageConfig) -> dict[str, Any]:
    options = _client_options(config)
    options.pop("retry_on_timeout")
    return options


def open_sync(config: StorageConfig) -> SyncStorage:
    """Open a blocking driver for `storage.url`."""
    url = config.url
    if url.startswith("memory://"):
        import fakeredis

        return SyncStorage(fakeredis.FakeRedis(server=_memory_server(url), decode_responses=True))
    if url.startswith(("redis://", "rediss://", "unix://")):
        return SyncStorage(redis.Redis.from_url(url, **_client_options(config)))
    if url.startswith("redis+cluster://"):
        from redis.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode(h, p) for h, p in _cluster_nodes(url)]  # type: ignore[no-untyped-call]
        return SyncStorage(RedisCluster(startup_nodes=nodes, **_cluster_options(config)))
    raise ValueError(f"storage.url: unsupported scheme in {url!r}")


def open_async(config: StorageConfig) -> AsyncStorage:
    """Open an asyncio driver for `storage.url`."""
    url = config.url
    if url.startswith("memory://"):
        import fakeredis

        client = fakeredis.FakeAsyncRedis(server=_memory_server(url), decode_responses=True)
        return AsyncStorage(client)
    if url.startswith(("redis://", "rediss://")):
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=64,
            timeout=max(config.timeout_ms / 1000, 1.0),
            **_client_options(config),
        )
        return AsyncStorage(
            redis.asyncio.Redis(connection_pool=pool),
            PipelinedConnection(url, connect_timeout_s=max(config.timeout_ms / 1000, 1.0)),
            timeout_s=config.timeout_ms / 1000,
        )
    if url.startswith("unix://"):
        return AsyncStorage(redis.asyncio.Redis.from_url(url, **_client_options(config)))
    if url.startswith("redis+cluster://"):
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode(h, p) for h, p in _cluster_nodes(url)]
        return AsyncStorage(RedisCluster(startup_nodes=nodes, **_cluster_options(config)))
    raise ValueError(f"storage.url: unsupported scheme in {url!r}")
