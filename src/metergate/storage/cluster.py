"""The hot path on Redis Cluster: one shared, pipelined connection per primary, calls routed by slot.

A call goes to the primary serving the slot of its first key (CRC16 of the key's hash tag, modulo
16384; for EVAL, EVALSHA and FCALL the first key follows the key count), on that primary's
PipelinedConnection. Every key of one customer shares a hash tag, so each admission script touches
one slot and one node. The slot map is read with CLUSTER SLOTS from any reachable node: by
`connect` (a server's start-up, outside any call's budget) or at first use, after a MOVED reply,
and after a node failed.

Failure handling. A call is sent again only when Redis certainly did not run it:

- MOVED (the slot lives elsewhere now): the slot is pointed at the node named in the reply, the
  call is sent there, and the whole map is re-read in the background.
- ASK (the slot is being migrated and this key already left): ASKING and the call are written
  back to back on the target's connection. Should another request ever slip between them, the
  target answers MOVED back to the source, which asks again: still nothing ran.
- TRYAGAIN (a multi-key call during a migration) and CLUSTERDOWN (a failover in progress): sent
  again after a short, growing delay.
- A node that cannot be connected to (a dead primary): nothing was sent, so the map is re-read
  and the call goes to the new owner if the slot moved; otherwise it fails with StorageUnavailable.

A call whose outcome is unknown is never sent again: a timeout, or a connection lost after the
call was written, raises StorageUnavailable exactly as PipelinedConnection does (which also
detects a stalled node and aborts its connection), and the map is re-read in the background.
Every call is bounded by its timeout as a whole, reading the map and following redirects
included; running out of it before the call could be sent raises StorageUnavailable saying that
nothing ran. A call that is still redirected after `max_attempts` tries fails the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from redis.crc import key_slot

from metergate.core.errors import StorageUnavailable
from metergate.storage.pipelined import PipelinedConnection, RedisReplyError, _Protocol

__all__ = ["SLOTS", "PipelinedCluster", "first_key"]

SLOTS = 16384

# Commands whose keys follow a key count (`EVALSHA sha numkeys key...`).
_COUNTED_KEYS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
# Commands without a key: sent to one primary, or, for SCRIPT, to every primary (a script loaded
# on one node only would leave the others answering NOSCRIPT).
_KEYLESS = frozenset(
    {"PING", "ECHO", "INFO", "TIME", "CLUSTER", "CONFIG", "DBSIZE", "COMMAND", "CLIENT",
     "FUNCTION", "SCRIPT", "FLUSHALL", "FLUSHDB", "LASTSAVE", "MEMORY", "SLOWLOG", "LATENCY"}
)  # fmt: skip
_EVERY_PRIMARY = frozenset({"SCRIPT", "FUNCTION"})
# Error replies after which the call is sent again: Redis ran nothing for any of them.
_REDIRECTS = frozenset({"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"})
_FIRST_DELAY_S = 0.005
_MAX_DELAY_S = 0.1


def first_key(args: Sequence[str | bytes]) -> str | bytes | None:
    """The key a command is routed by, or None for a command without a key."""
    if not args:
        raise ValueError("an empty command")
    name = args[0]
    if name == "EVALSHA" and len(args) > 3 and args[2] != "0":  # the hot path's only command
        return args[3]
    command = (name.decode() if isinstance(name, bytes) else name).upper()
    if command in _COUNTED_KEYS:
        return args[3] if len(args) > 3 and int(args[2]) > 0 else None
    if command in _KEYLESS or len(args) < 2:
        return None
    return args[1]


# Slots of recent keys: a customer's admissions repeat the same first key, and a lookup costs a
# tenth of hashing it again. Bounded by emptying it when full.
_SLOT_CACHE: dict[str | bytes, int] = {}
_SLOT_CACHE_SIZE = 65536


def _slot(key: str | bytes) -> int:
    slot = _SLOT_CACHE.get(key)
    if slot is None:
        if len(_SLOT_CACHE) >= _SLOT_CACHE_SIZE:
            _SLOT_CACHE.clear()
        slot = _SLOT_CACHE[key] = key_slot(key if isinstance(key, bytes) else key.encode())
    return slot


def _address(host: str, port: int | str) -> str:
    return f"{host}:{port}"


def _remaining(deadline: float | None) -> float | None:
    """Seconds left of a call's budget; none left raises (nothing has run at this point)."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise StorageUnavailable("Redis Cluster: no time left to send the call; nothing ran")
    return left


def _retrieve(task: asyncio.Task[None]) -> None:
    """Done callback of a refresh nobody may await: its failure is old news, not an error log."""
    if not task.cancelled():
        task.exception()


class _Node(PipelinedConnection):
    """A node's pipelined connection, with the two steps a plain `call` keeps to itself.

    It reaches into PipelinedConnection (same package): connecting apart from sending tells "could
    not connect, nothing was sent" (safe to send elsewhere) from "sent, outcome unknown" (not).
    """

    def __init__(self, address: str, url: str, *, connect_timeout_s: float) -> None:
        super().__init__(url, connect_timeout_s=connect_timeout_s)
        self.address = address

    @property
    def ready(self) -> bool:
        """Connected on the running loop: a call is written without a chance to fail first."""
        return self.live() is not None

    def live(self) -> _Protocol | None:
        """The connection when it is up on the running loop (to send on at once), else None."""
        protocol = self._protocol
        if protocol is not None and protocol.usable and self._loop is asyncio.get_running_loop():
            return protocol
        return None

    async def call_asking(self, args: tuple[str | bytes, ...], timeout: float | None) -> Any:
        """Send ASKING and then the call, adjacent on this connection; return the call's reply."""
        protocol = await self._get(timeout)
        # Each task writes its request in its first step, before it waits for anything; the two
        # steps run one right after the other (tasks start in creation order and nothing else
        # can be scheduled between two creations), so no other request gets between them.
        replies: tuple[Any, Any] = await asyncio.gather(
            self._send(protocol, ("ASKING",), timeout),
            self._send(protocol, args, timeout),
            return_exceptions=True,
        )
        command = replies[1]  # ASKING's own reply does not matter: see the module docstring
        if isinstance(command, BaseException):
            raise command
        return command


class PipelinedCluster:
    """A Redis Cluster through one PipelinedConnection per node; `call` is safe from any task.

    `call` routes by the first key: args[1], or args[3] for EVAL, EVALSHA and FCALL. SCRIPT goes
    to every primary (all must answer; the first one's reply is returned); other commands
    without a key go to one primary. Transactions (MULTI) are not supported.
    """

    def __init__(
        self,
        startup_nodes: Sequence[tuple[str, int]],
        *,
        username: str | None = None,
        password: str | None = None,
        ssl: bool = False,
        connect_timeout_s: float = 1.0,
        max_attempts: int = 16,
    ) -> None:
        if not startup_nodes:
            raise ValueError("a Redis Cluster needs at least one startup node")
        self.startup = [_address(host, port) for host, port in startup_nodes]
        self.connect_timeout_s = connect_timeout_s
        self.max_attempts = max_attempts
        auth = ""
        if password is not None:
            auth = f"{quote(username or '', safe='')}:{quote(password, safe='')}@"
        self._url_prefix = f"{'rediss' if ssl else 'redis'}://{auth}"
        # The owner of every slot (None: unknown, or served by nobody), and the distinct owners
        # (None: to be worked out again, after the map changed).
        self._slots: list[_Node | None] = [None] * SLOTS
        self._distinct: list[_Node] | None = None
        # Every node connected to so far, by "host:port". Nodes come and go rarely, so one that
        # stopped serving slots (a replica now, or dead) keeps its object until `aclose`; its
        # calls in flight still get their replies.
        self._nodes: dict[str, _Node] = {}
        self._refreshing: asyncio.Task[None] | None = None
        # When a node last failed us: the map is read from the others first.
        self._failed: dict[str, float] = {}

    def node(self, address: str) -> _Node:
        """The connection to the node at "host:port" (made on first use; it connects lazily)."""
        node = self._nodes.get(address)
        if node is None:
            host, _, port = address.rpartition(":")
            netloc = f"[{host}]" if ":" in host else host
            url = f"{self._url_prefix}{netloc}:{port}/0"
            node = self._nodes[address] = _Node(
                address, url, connect_timeout_s=self.connect_timeout_s
            )
        return node

    @property
    def primaries(self) -> list[str]:
        """The "host:port" of every node serving slots, as far as the client knows."""
        return [node.address for node in self._owners()]

    def _owners(self) -> list[_Node]:
        # Worked out from the map itself, so that a slot pointed elsewhere by MOVED counts too.
        if self._distinct is None:
            self._distinct = list(dict.fromkeys(n for n in self._slots if n is not None))
        return self._distinct

    def owner(self, slot: int) -> str | None:
        """The "host:port" of the node serving `slot` as far as the client knows."""
        node = self._slots[slot]
        return None if node is None else node.address

    async def connect(self, timeout: float | None = None) -> None:
        """Read the slot map and connect to every primary, ahead of the first calls.

        StorageUnavailable when the map cannot be read in time; a primary that cannot be
        connected to is left to the calls that need it (which re-read the map, as always).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        await self._refresh(deadline)
        left = _remaining(deadline)
        await asyncio.gather(
            *(node.connect(left) for node in self._owners()), return_exceptions=True
        )

    async def call(self, *args: str | bytes, timeout: float | None = None) -> Any:
        """Send one command to the node serving its first key and return its reply.

        An error reply raises RedisReplyError; with `timeout` (seconds, for the whole call), a call
        without a reply by then raises StorageUnavailable.
        """
        key = first_key(args)
        if key is None:
            return await self._keyless(args, timeout)
        slot = _slot(key)
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        node = self._slots[slot]
        protocol = None if node is None else node.live()
        if node is None or protocol is None:
            return await self._route(args, slot, deadline, None)
        # The hot path: the slot's owner is known and connected; its request is written at once
        # (straight to the connection's send step: one coroutine less per call).
        try:
            return await node._send(protocol, args, timeout)
        except RedisReplyError as exc:
            if str(exc).split(" ", 1)[0] not in _REDIRECTS:
                raise
            return await self._route(args, slot, deadline, (exc, node))
        except StorageUnavailable:
            self._lost(node)
            raise

    async def _route(
        self,
        args: tuple[str | bytes, ...],
        slot: int,
        deadline: float | None,
        redirected: tuple[RedisReplyError, _Node] | None,
    ) -> Any:
        """Send the call, following redirects; `redirected` is a reply the call already got (so
        nothing ran) and the node that gave it."""
        ask: _Node | None = None
        attempts = 0 if redirected is None else 1
        while True:
            if redirected is not None:
                ask = await self._redirect(*redirected, attempts, deadline)
                redirected = None
            node = ask if ask is not None else await self._owner(slot, deadline)
            if not node.ready:
                left = _remaining(deadline)
                try:
                    await node.connect(left)
                except StorageUnavailable:
                    # Nothing was sent. A dead primary whose replica took over: re-read the map
                    # and try the new owner; a node that merely cannot be reached: give up.
                    self._failed[node.address] = time.monotonic()
                    attempts += 1
                    if ask is not None or attempts >= self.max_attempts:
                        raise
                    await self._refresh(deadline)
                    if self._slots[slot] is node:
                        raise
                    continue
            left = _remaining(deadline)
            attempts += 1
            try:
                if ask is None:
                    return await node.call(*args, timeout=left)
                return await node.call_asking(args, left)
            except RedisReplyError as exc:
                if str(exc).split(" ", 1)[0] not in _REDIRECTS:
                    raise
                redirected = (exc, node)
            except StorageUnavailable:
                self._lost(node)
                raise

    async def _redirect(
        self, reply: RedisReplyError, replier: _Node, attempts: int, deadline: float | None
    ) -> _Node | None:
        """Act on a redirect or retry reply; return the node to send to with ASKING, if any."""
        text = str(reply)
        if attempts >= self.max_attempts:
            raise StorageUnavailable(
                f"Redis Cluster: still redirected after {attempts} attempts ({text}); nothing ran"
            )
        code, _, rest = text.partition(" ")
        if code in ("MOVED", "ASK"):
            slot, _, address = rest.partition(" ")
            host, _, port = address.rpartition(":")
            if host == "?":
                # The node knows no endpoint to give: ask the map instead.
                await self._refresh(deadline)
                return None
            # A redirect without a host names a node on the host of the one that replied.
            target = self.node(address if host else _address(replier.host, port))
            if code == "ASK":
                return target
            # MOVED: the slot has a new owner (a reshard or a failover); others may have moved
            # with it, so the whole map is re-read too, without making this call wait for it.
            self._slots[int(slot)] = target
            self._distinct = None
            self._refresh_soon()
            return None
        # TRYAGAIN or CLUSTERDOWN: wait a little, less than what is left of the budget.
        delay = min(_FIRST_DELAY_S * 2 ** (attempts - 1), _MAX_DELAY_S)
        left = _remaining(deadline)
        if left is not None and left <= delay:
            raise StorageUnavailable(f"Redis Cluster refused the call ({text}); nothing ran")
        if code == "CLUSTERDOWN":
            self._refresh_soon()
        await asyncio.sleep(delay)
        return None

    async def _owner(self, slot: int, deadline: float | None) -> _Node:
        node = self._slots[slot]
        if node is None:
            await self._refresh(deadline)
            node = self._slots[slot]
            if node is None:
                raise StorageUnavailable(f"no Redis Cluster node serves slot {slot}; nothing ran")
        return node

    async def _keyless(self, args: tuple[str | bytes, ...], timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        nodes = self._owners()
        if not nodes:
            await self._refresh(deadline)
            nodes = self._owners()
            if not nodes:
                raise StorageUnavailable("no Redis Cluster node serves any slot; nothing ran")
        name = args[0]
        if (name.decode() if isinstance(name, bytes) else name).upper() not in _EVERY_PRIMARY:
            node = nodes[0]
            left = _remaining(deadline)
            try:
                return await node.call(*args, timeout=left)
            except StorageUnavailable:
                self._lost(node)
                raise
        left = _remaining(deadline)
        replies = await asyncio.gather(
            *(node.call(*args, timeout=left) for node in nodes), return_exceptions=True
        )
        for node, reply in zip(nodes, replies, strict=True):
            if isinstance(reply, StorageUnavailable):
                self._lost(node)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies[0]

    def _lost(self, node: _Node) -> None:
        """A call on `node` timed out or lost its connection: the slots may have moved."""
        if self._nodes.get(node.address) is not node:
            return  # closed by `aclose`: reading the map would only connect again
        self._failed[node.address] = time.monotonic()
        self._refresh_soon()

    def _refresh_task(self) -> asyncio.Task[None]:
        """The slot map read in progress, or a new one: one at a time, shared by every caller."""
        loop = asyncio.get_running_loop()
        task = self._refreshing
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._refreshing = loop.create_task(self._load())
            task.add_done_callback(_retrieve)
        return task

    def _refresh_soon(self) -> None:
        self._refresh_task()

    async def _refresh(self, deadline: float | None) -> None:
        """Read the slot map (or wait for the read in progress) within the call's budget."""
        task = self._refresh_task()
        try:
            async with asyncio.timeout(_remaining(deadline)):
                # Shielded: a caller running out of time leaves the read to the others.
                await asyncio.shield(task)
        except TimeoutError:
            raise StorageUnavailable(
                "Redis Cluster: the slot map could not be read in time; nothing ran"
            ) from None

    async def _load(self) -> None:
        """Read CLUSTER SLOTS from the first node that answers: known primaries, then the startup
        nodes, the ones that failed us last."""
        candidates = list(dict.fromkeys(self.primaries + self.startup))
        candidates.sort(key=lambda address: self._failed.get(address, 0.0))
        problems = []
        for address in candidates:
            node = self.node(address)
            try:
                reply = await node.call("CLUSTER", "SLOTS", timeout=self.connect_timeout_s)
            except (StorageUnavailable, RedisReplyError) as exc:
                self._failed[address] = time.monotonic()
                problems.append(f"{address}: {exc}")
                continue
            self._failed.pop(address, None)
            self._apply(reply, node.host)
            return
        raise StorageUnavailable(
            "no Redis Cluster node answered CLUSTER SLOTS ("
            + "; ".join(problems)
            + "); nothing ran"
        )

    def _apply(self, reply: list[Any], asked_host: str) -> None:
        """Install the map of a CLUSTER SLOTS reply: [[first, last, [host, port, id], replicas...]]."""
        slots: list[_Node | None] = [None] * SLOTS
        for entry in reply:
            first, last, primary = int(entry[0]), int(entry[1]), entry[2]
            host = str(primary[0]) or asked_host  # an empty host: the node we asked
            if host == "?":
                continue  # an endpoint the node does not know: these slots stay unknown
            node = self.node(_address(host, int(primary[1])))
            slots[first : last + 1] = [node] * (last - first + 1)
        self._slots, self._distinct = slots, None

    async def aclose(self) -> None:
        """Close every node's connection; calls in flight fail with StorageUnavailable."""
        task, self._refreshing = self._refreshing, None
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                await asyncio.wait([task])  # unlike `await task`, keeps our own cancellation
        nodes = list(self._nodes.values())
        self._nodes.clear()
        self._slots, self._distinct = [None] * SLOTS, None
        self._failed.clear()
        for node in nodes:
            await node.aclose()
