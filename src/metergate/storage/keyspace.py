"""The embedded backend's data: one keyspace in Python structures, and the Redis commands on it.

Exactly the commands metergate's scripts, drivers and worker send, with Redis's semantics and
Redis's replies (RESP2 shapes: bytes for bulk strings, int, None for nil, lists, `Status` for
status replies, `CommandError` raised for error replies, worded as Redis 7 words them). A
command unknown here is refused as Redis refuses an unknown command.

Callers hold the server's lock around every command: nothing here is thread-safe on its own.
"""

from __future__ import annotations

import fnmatch
import math
import re
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["COMMANDS", "CommandError", "Keyspace", "Status", "format_float"]


class Status(bytes):
    """A status reply (`+OK`): bytes to a client, `{ok = ...}` to a script."""


class CommandError(Exception):
    """An error reply; `str(exc)` is its text, error code first (`ERR ...`, `WRONGTYPE ...`)."""


OK = Status(b"OK")
_WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"
_NOT_INT = "ERR value is not an integer or out of range"
_NOT_FLOAT = "ERR value is not a valid float"
_SYNTAX = "ERR syntax error"
_INT = re.compile(rb"-?(0|[1-9][0-9]*)")
_I64 = 2**63


def now_ms() -> int:
    """Redis's clock: epoch milliseconds."""
    return time.time_ns() // 1_000_000


def to_int(value: bytes, message: str = _NOT_INT) -> int:
    """A 64-bit integer argument, as Redis parses one (no sign but `-`, no spaces, no zeros first)."""
    if _INT.fullmatch(value) is None:
        raise CommandError(message)
    number = int(value)
    if not -_I64 <= number < _I64:
        raise CommandError(message)
    return number


def to_float(value: bytes, message: str = _NOT_FLOAT) -> float:
    """A float argument (`inf`, `-inf`, `+inf` included; NaN refused)."""
    try:
        number = float(value)
    except ValueError:
        raise CommandError(message) from None
    if math.isnan(number) or value != value.strip() or not value:
        raise CommandError(message)
    return number


def format_float(number: float) -> bytes:
    """A double as Redis 7.0 replies it (`%.17g`; integers without a fraction)."""
    if math.isinf(number):
        return b"inf" if number > 0 else b"-inf"
    if number.is_integer() and abs(number) < 2**53:
        return b"%d" % number
    return (b"%.17g" % number).replace(b"e+0", b"e+").replace(b"e-0", b"e-")


def format_incr_float(number: float) -> bytes:
    """INCRBYFLOAT's reply: no exponent, no trailing zeros (`%.17Lf`, trimmed)."""
    if math.isinf(number) or math.isnan(number):
        raise CommandError("ERR increment would produce NaN or Infinity")
    text = b"%.17f" % number
    text = b"%.17g" % float(text)
    if b"e" in text:
        text = (b"%.17f" % number).rstrip(b"0").rstrip(b".")
    return text


# ---------------------------------------------------------------------------------------------
# Values


class ZSet:
    """A sorted set: scores by member, and the (score, member) order, rebuilt after changes."""

    __slots__ = ("_order", "scores")

    def __init__(self) -> None:
        self.scores: dict[bytes, float] = {}
        self._order: list[tuple[float, bytes]] | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def add(self, member: bytes, score: float) -> None:
        if self.scores.get(member) != score:
            self.scores[member] = score
            self._order = None

    def remove(self, member: bytes) -> bool:
        if self.scores.pop(member, None) is None:
            return False
        self._order = None
        return True

    def order(self) -> list[tuple[float, bytes]]:
        if self._order is None:
            self._order = sorted((s, m) for m, s in self.scores.items())
        return self._order


StreamId = tuple[int, int]


@dataclass(slots=True)
class Pending:
    """A read, unacknowledged entry of a group: its owner, last delivery and delivery count."""

    consumer: bytes
    delivered_ms: int
    count: int


@dataclass(slots=True)
class Consumer:
    """A consumer of a group: when it was last seen and last read or claimed successfully."""

    seen_ms: int
    active_ms: int = -1


@dataclass(slots=True)
class Group:
    """A consumer group: the last id it delivered, its pending entries and its consumers."""

    last_id: StreamId
    entries_read: int | None
    pending: dict[StreamId, Pending] = field(default_factory=dict)
    consumers: dict[bytes, Consumer] = field(default_factory=dict)


class Stream:
    """A stream: ids in order, entries by id, the last id given out, consumer groups."""

    __slots__ = ("entries", "entries_added", "groups", "ids", "last_id", "max_deleted")

    def __init__(self) -> None:
        self.ids: list[StreamId] = []
        self.entries: dict[StreamId, list[bytes]] = {}
        self.last_id: StreamId = (0, 0)
        self.max_deleted: StreamId = (0, 0)
        self.entries_added = 0
        self.groups: dict[bytes, Group] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def delete(self, sid: StreamId) -> bool:
        if self.entries.pop(sid, None) is None:
            return False
        self.ids.pop(bisect_left(self.ids, sid))
        self.max_deleted = max(self.max_deleted, sid)
        return True

    def range(self, lo: StreamId, hi: StreamId) -> list[StreamId]:
        return self.ids[bisect_left(self.ids, lo) : bisect_right(self.ids, hi)]


def format_id(sid: StreamId) -> bytes:
    return b"%d-%d" % sid


_TYPE_NAMES: dict[type, bytes] = {
    bytes: b"string",
    dict: b"hash",
    list: b"list",
    set: b"set",
    ZSet: b"zset",
    Stream: b"stream",
}


class Keyspace:
    """The keys of one server (Redis's database 0) and their expiry times (epoch ms)."""

    def __init__(self) -> None:
        self.data: dict[bytes, Any] = {}
        self.expires: dict[bytes, int] = {}

    def get(self, key: bytes, kind: type) -> Any:
        """The value at `key` (None if missing or expired); WRONGTYPE if it is not a `kind`."""
        if key in self.expires and self.expires[key] <= now_ms():
            self.delete(key)
        value = self.data.get(key)
        if value is not None and type(value) is not kind:
            raise CommandError(_WRONGTYPE)
        return value

    def get_any(self, key: bytes) -> Any:
        if key in self.expires and self.expires[key] <= now_ms():
            self.delete(key)
        return self.data.get(key)

    def make(self, key: bytes, kind: type) -> Any:
        """The value at `key`, a new empty `kind` stored there if missing."""
        value = self.get(key, kind)
        if value is None:
            value = self.data[key] = kind()
        return value

    def put(self, key: bytes, value: Any) -> None:
        """Store `value` at `key`, dropping its expiry (as SET does)."""
        self.data[key] = value
        self.expires.pop(key, None)

    def delete(self, key: bytes) -> bool:
        self.expires.pop(key, None)
        return self.data.pop(key, None) is not None

    def drop_if_empty(self, key: bytes, value: Any) -> None:
        """Redis deletes a hash, list, set or sorted set once it is empty (never a stream)."""
        if not value and type(value) is not Stream:
            self.delete(key)

    def flush(self) -> None:
        self.data.clear()
        self.expires.clear()

    def live_keys(self) -> list[bytes]:
        now = now_ms()
        for key in [k for k, at in self.expires.items() if at <= now]:
            self.delete(key)
        return list(self.data)


Handler = Callable[[Keyspace, list[bytes]], Any]

COMMANDS: dict[bytes, tuple[Handler, int]] = {}
"""Command name (upper case) -> (handler, Redis arity: exact if positive, minimum if negative)."""


def command(name: str, arity: int) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        COMMANDS[name.encode()] = (handler, arity)
        return handler

    return register


def _options(args: list[bytes]) -> list[bytes]:
    return [a.upper() for a in args]


# ---------------------------------------------------------------------------------------------
# Keys and the server


@command("PING", -1)
def _ping(ks: Keyspace, args: list[bytes]) -> Any:
    if len(args) > 2:
        raise CommandError("ERR wrong number of arguments for 'ping' command")
    return args[1] if len(args) == 2 else Status(b"PONG")


@command("ECHO", 2)
def _echo(ks: Keyspace, args: list[bytes]) -> Any:
    return args[1]


@command("TIME", 1)
def _time(ks: Keyspace, args: list[bytes]) -> Any:
    now = time.time_ns() // 1000
    return [b"%d" % (now // 1_000_000), b"%d" % (now % 1_000_000)]


@command("DEL", -2)
def _del(ks: Keyspace, args: list[bytes]) -> Any:
    return sum(1 for key in args[1:] if ks.get_any(key) is not None and ks.delete(key))


COMMANDS[b"UNLINK"] = (_del, -2)


@command("EXISTS", -2)
def _exists(ks: Keyspace, args: list[bytes]) -> Any:
    return sum(1 for key in args[1:] if ks.get_any(key) is not None)


@command("TYPE", 2)
def _type(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get_any(args[1])
    return Status(b"none" if value is None else _TYPE_NAMES[type(value)])


def _expire_at(ks: Keyspace, args: list[bytes], deadline_ms: int) -> int:
    key = args[1]
    if ks.get_any(key) is None:
        return 0
    flags = _options(args[3:])
    current = ks.expires.get(key)
    if (
        (b"NX" in flags and current is not None)
        or (b"XX" in flags and current is None)
        or (b"GT" in flags and (current is None or deadline_ms <= current))
        or (b"LT" in flags and current is not None and deadline_ms >= current)
    ):
        return 0
    if deadline_ms <= now_ms():
        ks.delete(key)
    else:
        ks.expires[key] = deadline_ms
    return 1


@command("EXPIRE", -3)
def _expire(ks: Keyspace, args: list[bytes]) -> Any:
    return _expire_at(ks, args, now_ms() + to_int(args[2]) * 1000)


@command("PEXPIRE", -3)
def _pexpire(ks: Keyspace, args: list[bytes]) -> Any:
    return _expire_at(ks, args, now_ms() + to_int(args[2]))


@command("PERSIST", 2)
def _persist(ks: Keyspace, args: list[bytes]) -> Any:
    if ks.get_any(args[1]) is None:
        return 0
    return 1 if ks.expires.pop(args[1], None) is not None else 0


def _ttl_ms(ks: Keyspace, key: bytes) -> int:
    if ks.get_any(key) is None:
        return -2
    deadline = ks.expires.get(key)
    return -1 if deadline is None else max(deadline - now_ms(), 0)


@command("TTL", 2)
def _ttl(ks: Keyspace, args: list[bytes]) -> Any:
    ms = _ttl_ms(ks, args[1])
    return ms if ms < 0 else (ms + 500) // 1000


@command("PTTL", 2)
def _pttl(ks: Keyspace, args: list[bytes]) -> Any:
    return _ttl_ms(ks, args[1])


def _glob(pattern: bytes) -> Callable[[bytes], bool]:
    if pattern == b"*":
        return lambda key: True
    regex = re.compile(fnmatch.translate(pattern.decode("latin-1")).encode("latin-1"), re.S)
    return lambda key: regex.match(key) is not None


@command("KEYS", 2)
def _keys(ks: Keyspace, args: list[bytes]) -> Any:
    match = _glob(args[1])
    return [key for key in ks.live_keys() if match(key)]


@command("SCAN", -2)
def _scan(ks: Keyspace, args: list[bytes]) -> Any:
    cursor = to_int(args[1], "ERR invalid cursor")
    match, count, kind = _glob(b"*"), 10, None
    rest = args[2:]
    while rest:
        option = rest[0].upper()
        if len(rest) < 2:
            raise CommandError(_SYNTAX)
        if option == b"MATCH":
            match = _glob(rest[1])
        elif option == b"COUNT":
            count = to_int(rest[1])
            if count < 1:
                raise CommandError(_SYNTAX)
        elif option == b"TYPE":
            kind = rest[1].lower()
        else:
            raise CommandError(_SYNTAX)
        rest = rest[2:]
    keys = sorted(ks.live_keys())
    batch = keys[cursor : cursor + count]
    following = cursor + count if cursor + count < len(keys) else 0
    found = [
        key
        for key in batch
        if match(key) and (kind is None or _TYPE_NAMES[type(ks.data[key])] == kind)
    ]
    return [b"%d" % following, found]


@command("DBSIZE", 1)
def _dbsize(ks: Keyspace, args: list[bytes]) -> Any:
    return len(ks.live_keys())


@command("FLUSHALL", -1)
def _flushall(ks: Keyspace, args: list[bytes]) -> Any:
    ks.flush()
    return OK


COMMANDS[b"FLUSHDB"] = (_flushall, -1)


@command("SELECT", 2)
def _select(ks: Keyspace, args: list[bytes]) -> Any:
    if to_int(args[1], "ERR invalid DB index") != 0:
        raise CommandError("ERR DB index is out of range")
    return OK


# The configuration an embedded server reports: it never evicts a key.
_CONFIG = {b"maxmemory-policy": b"noeviction", b"maxmemory": b"0"}


@command("CONFIG", -2)
def _config(ks: Keyspace, args: list[bytes]) -> Any:
    sub = args[1].upper()
    if sub == b"GET" and len(args) >= 3:
        out: list[bytes] = []
        for pattern in args[2:]:
            match = _glob(pattern.lower())
            for name, value in _CONFIG.items():
                if match(name) and name not in out[::2]:
                    out += [name, value]
        return out
    if sub in (b"SET", b"RESETSTAT", b"REWRITE"):
        raise CommandError(f"ERR CONFIG {sub.decode()} is not supported by the embedded backend")
    raise CommandError(f"ERR unknown subcommand '{args[1].decode(errors='replace')}'.")


# ---------------------------------------------------------------------------------------------
# Strings


@command("GET", 2)
def _get(ks: Keyspace, args: list[bytes]) -> Any:
    return ks.get(args[1], bytes)


@command("MGET", -2)
def _mget(ks: Keyspace, args: list[bytes]) -> Any:
    out = []
    for key in args[1:]:
        value = ks.get_any(key)
        out.append(value if type(value) is bytes else None)
    return out


@command("SET", -3)
def _set(ks: Keyspace, args: list[bytes]) -> Any:
    key, value = args[1], args[2]
    nx = xx = get = keepttl = False
    deadline: int | None = None
    rest = args[3:]
    i = 0
    while i < len(rest):
        option = rest[i].upper()
        if option == b"NX" and not xx:
            nx = True
        elif option == b"XX" and not nx:
            xx = True
        elif option == b"GET":
            get = True
        elif option == b"KEEPTTL" and deadline is None:
            keepttl = True
        elif option in (b"EX", b"PX", b"EXAT", b"PXAT") and deadline is None and not keepttl:
            if i + 1 >= len(rest):
                raise CommandError(_SYNTAX)
            amount = to_int(rest[i + 1])
            if amount <= 0:
                raise CommandError("ERR invalid expire time in 'set' command")
            deadline = {
                b"EX": now_ms() + amount * 1000,
                b"PX": now_ms() + amount,
                b"EXAT": amount * 1000,
                b"PXAT": amount,
            }[option]
            i += 1
        else:
            raise CommandError(_SYNTAX)
        i += 1
    old = ks.get(key, bytes) if get else ks.get_any(key)
    if (nx and old is not None) or (xx and old is None):
        return old if get else None
    kept = ks.expires.get(key) if keepttl else None
    ks.put(key, value)
    if deadline is not None:
        ks.expires[key] = deadline
    elif kept is not None:
        ks.expires[key] = kept
    return old if get else OK


@command("SETNX", 3)
def _setnx(ks: Keyspace, args: list[bytes]) -> Any:
    if ks.get_any(args[1]) is not None:
        return 0
    ks.put(args[1], args[2])
    return 1


def _incr(ks: Keyspace, key: bytes, by: int) -> int:
    old = ks.get(key, bytes)
    number = 0 if old is None else to_int(old)
    number += by
    if not -_I64 <= number < _I64:
        raise CommandError("ERR increment or decrement would overflow")
    deadline = ks.expires.get(key)
    ks.put(key, b"%d" % number)
    if deadline is not None:
        ks.expires[key] = deadline
    return number


@command("INCR", 2)
def _incr_cmd(ks: Keyspace, args: list[bytes]) -> Any:
    return _incr(ks, args[1], 1)


@command("DECR", 2)
def _decr(ks: Keyspace, args: list[bytes]) -> Any:
    return _incr(ks, args[1], -1)


@command("INCRBY", 3)
def _incrby(ks: Keyspace, args: list[bytes]) -> Any:
    return _incr(ks, args[1], to_int(args[2]))


@command("DECRBY", 3)
def _decrby(ks: Keyspace, args: list[bytes]) -> Any:
    return _incr(ks, args[1], -to_int(args[2]))


@command("INCRBYFLOAT", 3)
def _incrbyfloat(ks: Keyspace, args: list[bytes]) -> Any:
    old = ks.get(args[1], bytes)
    number = (0.0 if old is None else to_float(old)) + to_float(args[2])
    reply = format_incr_float(number)
    deadline = ks.expires.get(args[1])
    ks.put(args[1], reply)
    if deadline is not None:
        ks.expires[args[1]] = deadline
    return reply


# ---------------------------------------------------------------------------------------------
# Hashes


@command("HGET", 3)
def _hget(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], dict)
    return None if value is None else value.get(args[2])


@command("HMGET", -3)
def _hmget(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], dict)
    if value is None:
        return [None] * (len(args) - 2)
    return [value.get(name) for name in args[2:]]


@command("HSET", -4)
def _hset(ks: Keyspace, args: list[bytes]) -> Any:
    if len(args) % 2:
        raise CommandError("ERR wrong number of arguments for 'hset' command")
    value = ks.make(args[1], dict)
    before = len(value)
    for i in range(2, len(args), 2):
        value[args[i]] = args[i + 1]
    return len(value) - before


@command("HMSET", -4)
def _hmset(ks: Keyspace, args: list[bytes]) -> Any:
    if len(args) % 2:
        raise CommandError("ERR wrong number of arguments for 'hmset' command")
    _hset(ks, args)
    return OK


@command("HSETNX", 4)
def _hsetnx(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.make(args[1], dict)
    if args[2] in value:
        return 0
    value[args[2]] = args[3]
    return 1


@command("HDEL", -3)
def _hdel(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], dict)
    if value is None:
        return 0
    removed = sum(1 for name in args[2:] if value.pop(name, None) is not None)
    ks.drop_if_empty(args[1], value)
    return removed


@command("HGETALL", 2)
def _hgetall(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], dict)
    return [] if value is None else [x for pair in value.items() for x in pair]


@command("HKEYS", 2)
def _hkeys(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], dict)
    return [] if value is None else list(value)


@command("HVALS", 2)
def _hvals(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], dict)
    return [] if value is None else list(value.values())


@command("HLEN", 2)
def _hlen(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], dict)
    return 0 if value is None else len(value)


@command("HEXISTS", 3)
def _hexists(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], dict)
    return int(value is not None and args[2] in value)


@command("HINCRBY", 4)
def _hincrby(ks: Keyspace, args: list[bytes]) -> Any:
    by = to_int(args[3])
    value = ks.make(args[1], dict)
    old = value.get(args[2])
    number = (0 if old is None else to_int(old, "ERR hash value is not an integer")) + by
    if not -_I64 <= number < _I64:
        raise CommandError("ERR increment or decrement would overflow")
    value[args[2]] = b"%d" % number
    return number


@command("HINCRBYFLOAT", 4)
def _hincrbyfloat(ks: Keyspace, args: list[bytes]) -> Any:
    by = to_float(args[3])
    value = ks.make(args[1], dict)
    old = value.get(args[2])
    number = (0.0 if old is None else to_float(old, "ERR hash value is not a float")) + by
    value[args[2]] = reply = format_incr_float(number)
    return reply


# ---------------------------------------------------------------------------------------------
# Lists and sets


@command("LPUSH", -3)
def _lpush(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.make(args[1], list)
    value[0:0] = args[:1:-1]
    return len(value)


@command("RPUSH", -3)
def _rpush(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.make(args[1], list)
    value.extend(args[2:])
    return len(value)


def _span(start: int, stop: int, length: int) -> tuple[int, int]:
    """Redis's inclusive index range, as a Python slice's bounds."""
    if start < 0:
        start = max(length + start, 0)
    if stop < 0:
        stop = length + stop
    stop = min(stop, length - 1)
    if start > stop or start >= length:
        return 0, 0
    return start, stop + 1


@command("LRANGE", 4)
def _lrange(ks: Keyspace, args: list[bytes]) -> Any:
    start, stop = to_int(args[2]), to_int(args[3])
    value = ks.get(args[1], list)
    if value is None:
        return []
    lo, hi = _span(start, stop, len(value))
    return value[lo:hi]


@command("LTRIM", 4)
def _ltrim(ks: Keyspace, args: list[bytes]) -> Any:
    start, stop = to_int(args[2]), to_int(args[3])
    value = ks.get(args[1], list)
    if value is not None:
        lo, hi = _span(start, stop, len(value))
        value[:] = value[lo:hi]
        ks.drop_if_empty(args[1], value)
    return OK


@command("LLEN", 2)
def _llen(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], list)
    return 0 if value is None else len(value)


@command("LINDEX", 3)
def _lindex(ks: Keyspace, args: list[bytes]) -> Any:
    index = to_int(args[2])
    value = ks.get(args[1], list)
    if value is None or not -len(value) <= index < len(value):
        return None
    return value[index]


@command("SADD", -3)
def _sadd(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.make(args[1], set)
    before = len(value)
    value.update(args[2:])
    return len(value) - before


@command("SREM", -3)
def _srem(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], set)
    if value is None:
        return 0
    before = len(value)
    value.difference_update(args[2:])
    removed = before - len(value)
    ks.drop_if_empty(args[1], value)
    return removed


@command("SMEMBERS", 2)
def _smembers(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], set)
    return [] if value is None else sorted(value)


@command("SISMEMBER", 3)
def _sismember(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], set)
    return int(value is not None and args[2] in value)


@command("SCARD", 2)
def _scard(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], set)
    return 0 if value is None else len(value)


# ---------------------------------------------------------------------------------------------
# Sorted sets


@command("ZADD", -4)
def _zadd(ks: Keyspace, args: list[bytes]) -> Any:
    i = 2
    flags: set[bytes] = set()
    while i < len(args) and args[i].upper() in (b"NX", b"XX", b"GT", b"LT", b"CH", b"INCR"):
        flags.add(args[i].upper())
        i += 1
    pairs = args[i:]
    if not pairs or len(pairs) % 2:
        raise CommandError(_SYNTAX)
    if b"NX" in flags and b"XX" in flags:
        raise CommandError("ERR XX and NX options at the same time are not compatible")
    if (b"NX" in flags and flags & {b"GT", b"LT"}) or {b"GT", b"LT"} <= flags:
        raise CommandError("ERR GT, LT, and/or NX options at the same time are not compatible")
    if b"INCR" in flags and len(pairs) != 2:
        raise CommandError("ERR INCR option supports a single increment-element pair")
    scores = [to_float(pairs[j]) for j in range(0, len(pairs), 2)]
    value = ks.get(args[1], ZSet)
    if value is None:
        if b"XX" in flags:
            return None if b"INCR" in flags else 0
        value = ks.data[args[1]] = ZSet()
    added = changed = 0
    result: float | None = None
    for score, member in zip(scores, pairs[1::2], strict=True):
        old = value.scores.get(member)
        if b"INCR" in flags:
            score = (old or 0.0) + score
            if math.isnan(score):
                raise CommandError("ERR resulting score is not a number (NaN)")
        if old is None:
            if b"XX" in flags:
                continue
            value.add(member, score)
            added += 1
            result = score
            continue
        if b"NX" in flags or (b"GT" in flags and score <= old) or (b"LT" in flags and score >= old):
            continue
        result = score
        if score != old:
            value.add(member, score)
            changed += 1
    ks.drop_if_empty(args[1], value)
    if b"INCR" in flags:
        return None if result is None else format_float(result)
    return added + changed if b"CH" in flags else added


@command("ZREM", -3)
def _zrem(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], ZSet)
    if value is None:
        return 0
    removed = sum(1 for member in args[2:] if value.remove(member))
    ks.drop_if_empty(args[1], value)
    return removed


@command("ZSCORE", 3)
def _zscore(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], ZSet)
    score = None if value is None else value.scores.get(args[2])
    return None if score is None else format_float(score)


@command("ZCARD", 2)
def _zcard(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], ZSet)
    return 0 if value is None else len(value)


@command("ZINCRBY", 4)
def _zincrby(ks: Keyspace, args: list[bytes]) -> Any:
    return _zadd(ks, [b"ZADD", args[1], b"INCR", args[2], args[3]])


def _score_bound(value: bytes) -> tuple[float, bool]:
    """A ZRANGEBYSCORE bound: the score and whether it is exclusive (`(`)."""
    exclusive = value[:1] == b"("
    text = value[1:] if exclusive else value
    try:
        number = float(text)
    except ValueError:
        raise CommandError("ERR min or max is not a float") from None
    if math.isnan(number) or not text or text != text.strip():
        raise CommandError("ERR min or max is not a float")
    return number, exclusive


def _by_score(value: ZSet, lo: bytes, hi: bytes) -> list[tuple[float, bytes]]:
    low, low_open = _score_bound(lo)
    high, high_open = _score_bound(hi)
    return [
        (s, m)
        for s, m in value.order()
        if (s > low if low_open else s >= low) and (s < high if high_open else s <= high)
    ]


def _with_scores(items: list[tuple[float, bytes]], scores: bool) -> list[bytes]:
    if not scores:
        return [m for _, m in items]
    return [x for s, m in items for x in (m, format_float(s))]


def _limit(items: list[Any], options: list[bytes]) -> list[Any]:
    upper = _options(options)
    if b"LIMIT" in upper:
        at = upper.index(b"LIMIT")
        if at + 2 >= len(options):
            raise CommandError(_SYNTAX)
        offset, count = to_int(options[at + 1]), to_int(options[at + 2])
        if offset < 0:
            return []
        return items[offset:] if count < 0 else items[offset : offset + count]
    return items


def _check_range_options(options: list[bytes], allowed: set[bytes]) -> None:
    upper = _options(options)
    i = 0
    while i < len(upper):
        if upper[i] not in allowed:
            raise CommandError(_SYNTAX)
        i += 3 if upper[i] == b"LIMIT" else 1


@command("ZRANGEBYSCORE", -4)
def _zrangebyscore(ks: Keyspace, args: list[bytes]) -> Any:
    _check_range_options(args[4:], {b"WITHSCORES", b"LIMIT"})
    value = ks.get(args[1], ZSet)
    if value is None:
        _score_bound(args[2]), _score_bound(args[3])
        return []
    items = _limit(_by_score(value, args[2], args[3]), args[4:])
    return _with_scores(items, b"WITHSCORES" in _options(args[4:]))


@command("ZREVRANGEBYSCORE", -4)
def _zrevrangebyscore(ks: Keyspace, args: list[bytes]) -> Any:
    _check_range_options(args[4:], {b"WITHSCORES", b"LIMIT"})
    value = ks.get(args[1], ZSet)
    if value is None:
        return []
    items = _limit(_by_score(value, args[3], args[2])[::-1], args[4:])
    return _with_scores(items, b"WITHSCORES" in _options(args[4:]))


@command("ZRANGE", -4)
def _zrange(ks: Keyspace, args: list[bytes]) -> Any:
    options = _options(args[4:])
    _check_range_options(args[4:], {b"WITHSCORES", b"LIMIT", b"BYSCORE", b"REV"})
    if b"BYSCORE" in options:
        lo, hi = (args[3], args[2]) if b"REV" in options else (args[2], args[3])
        value = ks.get(args[1], ZSet)
        if value is None:
            return []
        items = _by_score(value, lo, hi)
        if b"REV" in options:
            items = items[::-1]
        return _with_scores(_limit(items, args[4:]), b"WITHSCORES" in options)
    if b"LIMIT" in options:
        raise CommandError(
            "ERR syntax error, LIMIT is only supported in combination with either BYSCORE or BYLEX"
        )
    start, stop = to_int(args[2]), to_int(args[3])
    value = ks.get(args[1], ZSet)
    if value is None:
        return []
    order = value.order()[::-1] if b"REV" in options else value.order()
    first, end = _span(start, stop, len(order))
    return _with_scores(order[first:end], b"WITHSCORES" in options)


@command("ZREVRANGE", -4)
def _zrevrange(ks: Keyspace, args: list[bytes]) -> Any:
    return _zrange(ks, [*args[:4], b"REV", *args[4:]])


@command("ZREMRANGEBYSCORE", 4)
def _zremrangebyscore(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], ZSet)
    if value is None:
        _score_bound(args[2]), _score_bound(args[3])
        return 0
    doomed = _by_score(value, args[2], args[3])
    for _, member in doomed:
        value.remove(member)
    ks.drop_if_empty(args[1], value)
    return len(doomed)


@command("ZCOUNT", 4)
def _zcount(ks: Keyspace, args: list[bytes]) -> Any:
    value = ks.get(args[1], ZSet)
    return 0 if value is None else len(_by_score(value, args[2], args[3]))


# ---------------------------------------------------------------------------------------------
# Streams

_MAX_ID = (2**64 - 1, 2**64 - 1)
_BAD_ID = "ERR Invalid stream ID specified as stream command argument"


def parse_id(text: bytes, *, missing_seq: int = 0, exclusive_ok: bool = False) -> StreamId:
    """A stream id (`ms-seq`, or `ms` with `missing_seq`, `-`, `+`); `(` only where allowed."""
    if exclusive_ok and text[:1] == b"(":
        sid = parse_id(text[1:], missing_seq=missing_seq)
        return sid
    if text == b"-":
        return (0, 0)
    if text == b"+":
        return _MAX_ID
    ms, dash, seq = text.partition(b"-")
    try:
        if not ms.isdigit() or (dash and not seq.isdigit()):
            raise ValueError
        sid = (int(ms), int(seq) if dash else missing_seq)
    except ValueError:
        raise CommandError(_BAD_ID) from None
    if sid[0] >= 2**64 or sid[1] >= 2**64:
        raise CommandError(_BAD_ID)
    return sid


def _range_bounds(lo: bytes, hi: bytes) -> tuple[StreamId, StreamId] | None:
    """XRANGE's inclusive bounds (None for an empty range); `(` excludes, as in Redis 6.2+."""
    start = parse_id(lo, exclusive_ok=True)
    end = parse_id(hi, missing_seq=2**64 - 1, exclusive_ok=True)
    if lo[:1] == b"(":
        if start == _MAX_ID:
            raise CommandError("ERR invalid start ID for the interval")
        start = (start[0], start[1] + 1) if start[1] < 2**64 - 1 else (start[0] + 1, 0)
    if hi[:1] == b"(":
        if end == (0, 0):
            raise CommandError("ERR invalid end ID for the interval")
        end = (end[0], end[1] - 1) if end[1] > 0 else (end[0] - 1, 2**64 - 1)
    return None if start > end else (start, end)


def _entry(stream: Stream, sid: StreamId) -> list[Any]:
    return [format_id(sid), list(stream.entries[sid])]


def _trim(stream: Stream, strategy: bytes, threshold: bytes) -> int:
    """XADD's and XTRIM's trimming (exact; Redis's `~` may keep more, never fewer)."""
    if strategy == b"MAXLEN":
        keep = to_int(threshold)
        if keep < 0:
            raise CommandError("ERR The MAXLEN argument must be >= 0.")
        doomed = stream.ids[: max(len(stream.ids) - keep, 0)]
    else:
        cut = parse_id(threshold)
        doomed = stream.ids[: bisect_left(stream.ids, cut)]
    for sid in doomed:
        del stream.entries[sid]
    del stream.ids[: len(doomed)]
    return len(doomed)


def _trim_options(args: list[bytes]) -> tuple[tuple[bytes, bytes] | None, list[bytes]]:
    """Parse `MAXLEN|MINID [=|~] threshold [LIMIT n]` at the start of `args`."""
    if not args or args[0].upper() not in (b"MAXLEN", b"MINID"):
        return None, args
    strategy = args[0].upper()
    rest = args[1:]
    if rest and rest[0] in (b"=", b"~"):
        rest = rest[1:]
    if not rest:
        raise CommandError(_SYNTAX)
    threshold, rest = rest[0], rest[1:]
    if len(rest) >= 2 and rest[0].upper() == b"LIMIT":
        to_int(rest[1])
        rest = rest[2:]
    return (strategy, threshold), rest


@command("XADD", -5)
def _xadd(ks: Keyspace, args: list[bytes]) -> Any:
    key = args[1]
    rest = args[2:]
    nomkstream = False
    if rest and rest[0].upper() == b"NOMKSTREAM":
        nomkstream, rest = True, rest[1:]
    trim, rest = _trim_options(rest)
    if not rest:
        raise CommandError(_SYNTAX)
    id_text, fields = rest[0], rest[1:]
    if not fields or len(fields) % 2:
        raise CommandError("ERR wrong number of arguments for 'xadd' command")
    stream = ks.get(key, Stream)
    if stream is None and nomkstream:
        return None
    last = stream.last_id if stream is not None else (0, 0)
    if id_text == b"*":
        ms = now_ms()
        sid = (ms, 0) if ms > last[0] else (last[0], last[1] + 1)
    elif id_text.endswith(b"-*"):
        ms = parse_id(id_text[:-2])[0]
        sid = (ms, 0) if ms > last[0] else (ms, last[1] + 1)
        if ms < last[0]:
            raise CommandError(
                "ERR The ID specified in XADD is equal or smaller than the target stream top item"
            )
    else:
        sid = parse_id(id_text)
        if sid == (0, 0):
            raise CommandError("ERR The ID specified in XADD must be greater than 0-0")
        if sid <= last:
            raise CommandError(
                "ERR The ID specified in XADD is equal or smaller than the target stream top item"
            )
    if stream is None:
        stream = ks.data[key] = Stream()
    stream.ids.append(sid)
    stream.entries[sid] = list(fields)
    stream.last_id = sid
    stream.entries_added += 1
    if trim is not None:
        _trim(stream, *trim)
    return format_id(sid)


@command("XLEN", 2)
def _xlen(ks: Keyspace, args: list[bytes]) -> Any:
    stream = ks.get(args[1], Stream)
    return 0 if stream is None else len(stream)


def _count_option(args: list[bytes]) -> int | None:
    if not args:
        return None
    if len(args) != 2 or args[0].upper() != b"COUNT":
        raise CommandError(_SYNTAX)
    return to_int(args[1])


@command("XRANGE", -4)
def _xrange(ks: Keyspace, args: list[bytes]) -> Any:
    count = _count_option(args[4:])
    bounds = _range_bounds(args[2], args[3])
    stream = ks.get(args[1], Stream)
    if stream is None or bounds is None or count == 0:
        return []
    ids = stream.range(*bounds)
    if count is not None and count > 0:
        ids = ids[:count]
    return [_entry(stream, sid) for sid in ids]


@command("XREVRANGE", -4)
def _xrevrange(ks: Keyspace, args: list[bytes]) -> Any:
    count = _count_option(args[4:])
    bounds = _range_bounds(args[3], args[2])
    stream = ks.get(args[1], Stream)
    if stream is None or bounds is None or count == 0:
        return []
    ids = stream.range(*bounds)[::-1]
    if count is not None and count > 0:
        ids = ids[:count]
    return [_entry(stream, sid) for sid in ids]


@command("XDEL", -3)
def _xdel(ks: Keyspace, args: list[bytes]) -> Any:
    ids = [parse_id(a) for a in args[2:]]
    stream = ks.get(args[1], Stream)
    return 0 if stream is None else sum(1 for sid in ids if stream.delete(sid))


@command("XTRIM", -4)
def _xtrim(ks: Keyspace, args: list[bytes]) -> Any:
    trim, rest = _trim_options(args[2:])
    if trim is None or rest:
        raise CommandError(_SYNTAX)
    stream = ks.get(args[1], Stream)
    return 0 if stream is None else _trim(stream, *trim)


def _group(ks: Keyspace, key: bytes, name: bytes, where: str = "") -> tuple[Stream, Group]:
    stream = ks.get(key, Stream)
    group = None if stream is None else stream.groups.get(name)
    if stream is None or group is None:
        raise CommandError(
            f"NOGROUP No such key '{key.decode(errors='replace')}' or consumer group "
            f"'{name.decode(errors='replace')}'{where}"
        )
    return stream, group


def _consumer(group: Group, name: bytes, now: int) -> Consumer:
    consumer = group.consumers.get(name)
    if consumer is None:
        consumer = group.consumers[name] = Consumer(now)
    consumer.seen_ms = now
    return consumer


@command("XGROUP", -2)
def _xgroup(ks: Keyspace, args: list[bytes]) -> Any:
    sub = args[1].upper()
    if sub == b"CREATE":
        if len(args) < 5:
            raise CommandError("ERR wrong number of arguments for 'xgroup|create' command")
        key, name, id_text = args[2], args[3], args[4]
        options = _options(args[5:])
        stream = ks.get(key, Stream)
        if stream is None:
            if b"MKSTREAM" not in options:
                raise CommandError(
                    "ERR The XGROUP subcommand requires the key to exist. Note that for "
                    "CREATE you may want to use the MKSTREAM option to create an empty stream "
                    "automatically."
                )
            stream = ks.data[key] = Stream()
        if name in stream.groups:
            raise CommandError("BUSYGROUP Consumer Group name already exists")
        last = stream.last_id if id_text == b"$" else parse_id(id_text)
        read = stream.entries_added if id_text == b"$" else 0 if last == (0, 0) else None
        stream.groups[name] = Group(last, read)
        return OK
    if sub == b"DESTROY" and len(args) == 4:
        stream = ks.get(args[2], Stream)
        if stream is None:
            raise CommandError(
                "ERR The XGROUP subcommand requires the key to exist. Note that for "
                "CREATE you may want to use the MKSTREAM option to create an empty stream "
                "automatically."
            )
        return int(stream.groups.pop(args[3], None) is not None)
    if sub == b"CREATECONSUMER" and len(args) == 5:
        _, group = _group(ks, args[2], args[3])
        if args[4] in group.consumers:
            return 0
        group.consumers[args[4]] = Consumer(now_ms())
        return 1
    if sub == b"DELCONSUMER" and len(args) == 5:
        _, group = _group(ks, args[2], args[3])
        consumer = group.consumers.pop(args[4], None)
        if consumer is None:
            return 0
        owned = [sid for sid, p in group.pending.items() if p.consumer == args[4]]
        for sid in owned:
            del group.pending[sid]
        return len(owned)
    if sub == b"SETID" and len(args) >= 5:
        stream, group = _group(ks, args[2], args[3])
        group.last_id = stream.last_id if args[4] == b"$" else parse_id(args[4])
        return OK
    raise CommandError(f"ERR unknown subcommand '{args[1].decode(errors='replace')}'.")


@command("XREADGROUP", -7)
def _xreadgroup(ks: Keyspace, args: list[bytes]) -> Any:
    if args[1].upper() != b"GROUP":
        raise CommandError(_SYNTAX)
    name, consumer_name = args[2], args[3]
    count: int | None = None
    noack = False
    i = 4
    while i < len(args) and args[i].upper() != b"STREAMS":
        option = args[i].upper()
        if option == b"COUNT" and i + 1 < len(args):
            count = to_int(args[i + 1])
            i += 2
        elif option == b"BLOCK" and i + 1 < len(args):
            to_int(args[i + 1])  # nothing else writes while a caller waits here: never blocks
            i += 2
        elif option == b"NOACK":
            noack = True
            i += 1
        else:
            raise CommandError(_SYNTAX)
    streams = args[i + 1 :]
    if i >= len(args) or not streams or len(streams) % 2:
        raise CommandError(
            "ERR Unbalanced 'xreadgroup' list of streams: for each stream key an ID or '>' "
            "must be specified."
        )
    half = len(streams) // 2
    pairs = list(zip(streams[:half], streams[half:], strict=True))
    where = " in XREADGROUP with GROUP option"
    targets = [(key, *_group(ks, key, name, where), id_text) for key, id_text in pairs]
    now = now_ms()
    out = []
    for key, stream, group, id_text in targets:
        consumer = _consumer(group, consumer_name, now)
        rows: list[Any] = []
        if id_text == b">":
            ids = stream.ids[bisect_right(stream.ids, group.last_id) :]
            if count:
                ids = ids[:count]
            for sid in ids:
                group.last_id = sid
                if group.entries_read is not None:
                    group.entries_read += 1
                if not noack:
                    group.pending[sid] = Pending(consumer_name, now, 1)
                rows.append(_entry(stream, sid))
            if ids:
                consumer.active_ms = now
            if not rows:
                continue
        else:
            start = parse_id(id_text)
            mine = sorted(sid for sid, p in group.pending.items() if p.consumer == consumer_name)
            mine = [sid for sid in mine if sid > start]
            if count:
                mine = mine[:count]
            for sid in mine:
                p = group.pending[sid]
                p.delivered_ms, p.count = now, p.count + 1
                rows.append(
                    _entry(stream, sid) if sid in stream.entries else [format_id(sid), None]
                )
        out.append([key, rows])
    return out or None


@command("XACK", -4)
def _xack(ks: Keyspace, args: list[bytes]) -> Any:
    ids = [parse_id(a) for a in args[3:]]
    stream = ks.get(args[1], Stream)
    group = None if stream is None else stream.groups.get(args[2])
    if group is None:
        return 0
    return sum(1 for sid in ids if group.pending.pop(sid, None) is not None)


@command("XPENDING", -3)
def _xpending(ks: Keyspace, args: list[bytes]) -> Any:
    _, group = _group(ks, args[1], args[2])
    now = now_ms()
    if len(args) == 3:
        if not group.pending:
            return [0, None, None, None]
        ids = sorted(group.pending)
        owners: dict[bytes, int] = {}
        for p in group.pending.values():
            owners[p.consumer] = owners.get(p.consumer, 0) + 1
        return [
            len(ids),
            format_id(ids[0]),
            format_id(ids[-1]),
            [[c, b"%d" % n] for c, n in sorted(owners.items())],
        ]
    rest = args[3:]
    min_idle = 0
    if rest[0].upper() == b"IDLE":
        if len(rest) < 2:
            raise CommandError(_SYNTAX)
        min_idle, rest = to_int(rest[1]), rest[2:]
    if len(rest) not in (3, 4):
        raise CommandError(_SYNTAX)
    bounds = _range_bounds(rest[0], rest[1])
    count = to_int(rest[2])
    owner = rest[3] if len(rest) == 4 else None
    if bounds is None or count <= 0:
        return []
    out = []
    for sid in sorted(group.pending):
        if not bounds[0] <= sid <= bounds[1]:
            continue
        p = group.pending[sid]
        idle = now - p.delivered_ms
        if (owner is not None and p.consumer != owner) or idle < min_idle:
            continue
        out.append([format_id(sid), p.consumer, idle, p.count])
        if len(out) == count:
            break
    return out


def _claim(
    stream: Stream, group: Group, consumer: bytes, sid: StreamId, now: int, *, count: bool
) -> bool:
    """Give a pending entry to `consumer`; False (and drop it) if the entry was deleted."""
    if sid not in stream.entries:
        group.pending.pop(sid, None)
        return False
    p = group.pending[sid]
    p.consumer, p.delivered_ms = consumer, now
    if count:
        p.count += 1
    return True


@command("XCLAIM", -6)
def _xclaim(ks: Keyspace, args: list[bytes]) -> Any:
    stream, group = _group(ks, args[1], args[2])
    consumer_name = args[3]
    min_idle = to_int(args[4], "ERR Invalid min-idle-time argument for XCLAIM")
    ids: list[StreamId] = []
    i = 5
    while i < len(args):
        try:
            ids.append(parse_id(args[i]))
        except CommandError:
            break
        i += 1
    justid = False
    force = False
    idle_ms: int | None = None
    retry: int | None = None
    while i < len(args):
        option = args[i].upper()
        if option == b"JUSTID":
            justid = True
        elif option == b"FORCE":
            force = True
        elif option in (b"IDLE", b"TIME", b"RETRYCOUNT", b"LASTID") and i + 1 < len(args):
            if option == b"IDLE":
                idle_ms = to_int(args[i + 1])
            elif option == b"TIME":
                idle_ms = now_ms() - to_int(args[i + 1])
            elif option == b"RETRYCOUNT":
                retry = to_int(args[i + 1])
            i += 1
        else:
            raise CommandError(f"ERR Unrecognized XCLAIM option '{args[i].decode()}'")
        i += 1
    now = now_ms()
    consumer = _consumer(group, consumer_name, now)
    out: list[Any] = []
    for sid in ids:
        p = group.pending.get(sid)
        if p is None:
            if not force or sid not in stream.entries:
                continue
            p = group.pending[sid] = Pending(consumer_name, now, 0)
        elif now - p.delivered_ms < min_idle:
            continue
        if not _claim(stream, group, consumer_name, sid, now, count=not justid):
            continue
        if idle_ms is not None:
            p.delivered_ms = now - idle_ms
        if retry is not None:
            p.count = retry
        consumer.active_ms = now
        out.append(format_id(sid) if justid else _entry(stream, sid))
    return out


@command("XAUTOCLAIM", -6)
def _xautoclaim(ks: Keyspace, args: list[bytes]) -> Any:
    stream, group = _group(ks, args[1], args[2])
    consumer_name = args[3]
    min_idle = to_int(args[4], "ERR Invalid min-idle-time argument for XAUTOCLAIM")
    start = parse_id(args[5], exclusive_ok=False)
    count, justid = 100, False
    i = 6
    while i < len(args):
        option = args[i].upper()
        if option == b"COUNT" and i + 1 < len(args):
            count = to_int(args[i + 1])
            if not 1 <= count <= 2**63 // 10:
                raise CommandError("ERR COUNT must be > 0")
            i += 2
        elif option == b"JUSTID":
            justid, i = True, i + 1
        else:
            raise CommandError(_SYNTAX)
    now = now_ms()
    consumer = _consumer(group, consumer_name, now)
    candidates = sorted(sid for sid in group.pending if sid >= start)
    claimed: list[Any] = []
    deleted: list[bytes] = []
    scanned = 0
    following = (0, 0)
    for position, sid in enumerate(candidates):
        if scanned == count * 10 or len(claimed) == count:
            following = candidates[position]
            break
        scanned += 1
        p = group.pending[sid]
        if now - p.delivered_ms < min_idle:
            continue
        if not _claim(stream, group, consumer_name, sid, now, count=not justid):
            deleted.append(format_id(sid))
            continue
        consumer.active_ms = now
        claimed.append(format_id(sid) if justid else _entry(stream, sid))
    return [format_id(following), claimed, deleted]


@command("XINFO", -2)
def _xinfo(ks: Keyspace, args: list[bytes]) -> Any:
    sub = args[1].upper()
    now = now_ms()
    if sub == b"GROUPS" and len(args) == 3:
        stream = ks.get(args[2], Stream)
        if stream is None:
            raise CommandError("ERR no such key")
        out = []
        for name, group in stream.groups.items():
            out.append(
                [
                    b"name", name,
                    b"consumers", len(group.consumers),
                    b"pending", len(group.pending),
                    b"last-delivered-id", format_id(group.last_id),
                    b"entries-read", group.entries_read,
                    b"lag", _lag(stream, group),
                ]
            )  # fmt: skip
        return out
    if sub == b"CONSUMERS" and len(args) == 4:
        _, group = _group(ks, args[2], args[3])
        out = []
        for name, consumer in group.consumers.items():
            pending = sum(1 for p in group.pending.values() if p.consumer == name)
            out.append(
                [
                    b"name", name,
                    b"pending", pending,
                    b"idle", now - consumer.seen_ms,
                ]
            )  # fmt: skip
        return out
    if sub == b"STREAM" and len(args) >= 3:
        stream = ks.get(args[2], Stream)
        if stream is None:
            raise CommandError("ERR no such key")
        first = _entry(stream, stream.ids[0]) if stream.ids else None
        last = _entry(stream, stream.ids[-1]) if stream.ids else None
        return [
            b"length", len(stream),
            b"radix-tree-keys", 1,
            b"radix-tree-nodes", 2,
            b"last-generated-id", format_id(stream.last_id),
            b"max-deleted-entry-id", format_id(stream.max_deleted),
            b"entries-added", stream.entries_added,
            b"recorded-first-entry-id", format_id(stream.ids[0] if stream.ids else (0, 0)),
            b"groups", len(stream.groups),
            b"first-entry", first,
            b"last-entry", last,
        ]  # fmt: skip
    raise CommandError(f"ERR unknown subcommand '{args[1].decode(errors='replace')}'.")


def _lag(stream: Stream, group: Group) -> int | None:
    if group.entries_read is None:
        return None
    if not stream.ids or group.last_id >= stream.last_id:
        return 0
    return stream.entries_added - group.entries_read
