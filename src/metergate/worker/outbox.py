"""The worker's side of the outboxes: read with the consumer group, claim, settle, trim.

Every operation that must not interleave with another worker's is one Lua script (claim.lua,
deliver.lua, trim.lua); plain reads go through the client. The consumer group's pending list is
the record of what is in flight: an entry leaves it (XACK) only when every destination has it or
has given up on it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import redis

from metergate.core.errors import StorageUnavailable
from metergate.core.flows import Script
from metergate.storage import AsyncStorage
from metergate.worker.events import OutboxEvent, parse_entry
from metergate.worker.keys import GROUP, WorkerKeys
from metergate.worker.schedule import DeliveryState

__all__ = ["Outbox"]

T = TypeVar("T")
_NETWORK_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


def _pairs(fields: Any) -> dict[str, str]:
    """Stream entry fields as a dict, from redis-py's dict or a script's flat list."""
    if isinstance(fields, Mapping):
        return {str(k): str(v) for k, v in fields.items()}
    flat = list(fields or [])
    return {str(k): str(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}


class Outbox:
    """Reads and settles the partition outboxes for one consumer of the group."""

    def __init__(
        self, storage: AsyncStorage, keys: WorkerKeys, consumer: str, group: str = GROUP
    ) -> None:
        self.storage = storage
        self.keys = keys
        self.consumer = consumer
        self.group = group
        self._groups: set[int] = set()
        self._cursors: dict[int, str] = {}

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except _NETWORK_ERRORS as exc:
            raise StorageUnavailable(str(exc) or type(exc).__name__) from exc

    async def _script(self, name: str, keys: list[str], args: list[str]) -> Any:
        return await self.storage.run(Script(name, tuple(keys), tuple(args)))

    async def ensure_group(self, partition: int) -> None:
        """Create the group on a partition's outbox (and the stream), from its first entry."""
        if partition in self._groups:
            return
        client = self.storage.client
        try:
            await self._call(
                lambda: client.xgroup_create(
                    self.keys.outbox(partition), self.group, id="0", mkstream=True
                )
            )
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(partition)

    async def _with_group(self, partition: int, fn: Callable[[], Awaitable[T]]) -> T:
        await self.ensure_group(partition)
        try:
            return await self._call(fn)
        except redis.ResponseError as exc:
            # The stream was deleted (FLUSHALL, a Redis without persistence restarted): the
            # group went with it. Create both again and carry on from the first entry.
            if "NOGROUP" not in str(exc):
                raise
            self._groups.discard(partition)
            await self.ensure_group(partition)
            return await self._call(fn)

    def _events(self, partition: int, rows: Any) -> list[OutboxEvent]:
        out = []
        for stream_id, fields in rows or []:
            if fields is None:
                continue
            out.append(parse_entry(str(stream_id), _pairs(fields), partition))
        return out

    async def read_new(self, partition: int, count: int) -> list[OutboxEvent]:
        """Take up to `count` entries nobody in the group has read yet (they become ours)."""
        client = self.storage.client
        key = self.keys.outbox(partition)
        reply = await self._with_group(
            partition,
            lambda: client.xreadgroup(self.group, self.consumer, {key: ">"}, count=count),
        )
        rows: Any = []
        if isinstance(reply, Mapping):
            rows = next(iter(reply.values()), [])
            rows = rows[0] if rows and isinstance(rows[0], list) else rows
        elif reply:
            rows = reply[0][1]
        return self._events(partition, rows)

    async def reclaim(
        self, partition: int, min_idle_ms: int, count: int
    ) -> tuple[list[OutboxEvent], list[str]]:
        """Take over entries idle for `min_idle_ms` (a crashed owner, or waiting for a retry).

        Returns the entries and the ids of pending entries that were deleted from the stream.
        """
        client = self.storage.client
        key = self.keys.outbox(partition)
        cursor = self._cursors.get(partition, "0-0")
        reply = await self._with_group(
            partition,
            lambda: client.xautoclaim(
                key, self.group, self.consumer, min_idle_ms, start_id=cursor, count=count
            ),
        )
        self._cursors[partition] = str(reply[0])
        deleted = [str(x) for x in reply[2]] if len(reply) > 2 else []
        return self._events(partition, reply[1]), deleted

    async def due_retries(self, partition: int, now_ms: int, count: int) -> list[str]:
        """Return the stream ids whose next attempt is due, earliest first."""
        client = self.storage.client
        key = self.keys.retries(partition)
        ids = await self._call(
            lambda: client.zrangebyscore(key, "-inf", now_ms, start=0, num=count)
        )
        return [str(x) for x in ids]

    async def claim(self, partition: int, stream_id: str, min_idle_ms: int) -> OutboxEvent | None:
        """Take a pending entry for a delivery pass; None if another worker has it or it is gone."""
        await self.ensure_group(partition)
        reply = await self._script(
            "claim",
            [self.keys.outbox(partition), self.keys.retries(partition)],
            [self.group, self.consumer, stream_id, str(min_idle_ms)],
        )
        if reply[0] != "ok":
            return None
        return parse_entry(str(reply[1]), _pairs(reply[2:]), partition)

    async def states(self, partition: int, stream_id: str) -> dict[str, DeliveryState]:
        """Return an entry's per-destination delivery state (empty before any failure)."""
        client = self.storage.client
        key = self.keys.delivery(partition, stream_id)
        raw = await self._call(lambda: client.hgetall(key))
        out = {}
        for dest, text in (raw or {}).items():
            try:
                out[str(dest)] = DeliveryState.decode(str(text))
            except ValueError:
                continue  # unreadable: the destination is attempted again
        return out

    async def settle(
        self,
        event: OutboxEvent,
        states: Mapping[str, DeliveryState],
        reasons: Mapping[str, str],
        now_ms: int,
        *,
        dead_maxlen: int,
        state_ttl_s: int,
    ) -> int | None:
        """Record a delivery pass; acknowledge the entry once every destination is final.

        Returns None when acknowledged, else the next attempt (epoch ms).
        """
        p = event.partition
        args = [
            self.group,
            event.stream_id,
            str(now_ms),
            str(dead_maxlen),
            str(state_ttl_s),
            str(len(states)),
        ]
        for dest, state in states.items():
            args += [dest, state.encode(), reasons.get(dest, "")[:500]]
        reply = await self._script(
            "deliver",
            [
                self.keys.outbox(p),
                self.keys.delivery(p, event.stream_id),
                self.keys.retries(p),
                self.keys.dead_letters(p),
            ],
            args,
        )
        return None if reply[0] == "done" else int(reply[1])

    async def forget(self, partition: int, stream_ids: list[str]) -> None:
        """Drop the delivery state of entries that no longer exist in the stream."""
        client = self.storage.client
        states = [self.keys.delivery(partition, sid) for sid in stream_ids]
        await self._call(lambda: client.delete(*states))
        await self._call(lambda: client.zrem(self.keys.retries(partition), *stream_ids))

    async def trim(self, partition: int, retention_ms: int, consumer_idle_ms: int) -> int:
        """Trim delivered entries older than `retention_ms`; return how many were dropped."""
        if partition not in self._groups:
            return 0
        reply = await self._script(
            "trim",
            [self.keys.outbox(partition)],
            [self.group, str(retention_ms), str(consumer_idle_ms)],
        )
        return int(reply[0])
