"""The embedded backend (`memory://`): an in-process Redis for one process, scripts compiled once.

Design. Each `memory://` URL names one `EmbeddedServer`: a keyspace of plain Python structures
(storage/keyspace.py implements exactly the Redis commands metergate's scripts, drivers and worker
send, with Redis's semantics and replies) and a Lua 5.1 runtime (lupa) that runs the project's
Lua scripts against it the way Redis 7 does: KEYS and ARGV, `redis.call`/`redis.pcall` going
straight to the command functions (no protocol in between), the same Lua-to-reply conversions,
read-only globals, cjson, the same error replies with the script's SHA1 and line, NOSCRIPT after
SCRIPT FLUSH. A script is compiled once per server (by EVAL or SCRIPT LOAD) and its function is
called again on every EVALSHA. One lock per server makes every command and every script atomic,
as Redis's single thread does, for any number of threads and event loops.

The clients are redis-py's own `Redis` and `asyncio.Redis` classes whose `execute_command` hands
the arguments to the server instead of a connection, and whose replies go through redis-py's
response callbacks as usual: every redis-py command method works, pipelines too (a transaction
runs under the lock at once). Only public APIs of redis-py and lupa are used.

Why this design: fakeredis's public clients compile a script's whole source on every EVALSHA,
and running the scripts on lupa against fakeredis's public client would cost a RESP round trip
in Python (~55 µs) per `redis.call`; admissions on plain fakeredis measured ~9x slower than here,
and on the earlier fast path over fakeredis's private classes ~3.5x slower. A keyspace of our own
is code to keep, so it holds only what metergate sends, and tests/storage/test_embedded.py
compares its replies and errors with a real Redis.

Where it differs from Redis, knowingly: it speaks RESP2 (redis-py's default before 8.0); `~`
trimming (XADD, XTRIM) trims exactly, which Redis allows; XREADGROUP never blocks (nothing else
could write meanwhile); the Lua libraries bit, struct and cmsgpack are absent and the string,
table and math tables are copies a script could change, not read-only ones; a transaction's
queued commands are not checked for syntax before any runs (no EXECABORT).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lupa.lua51 as lua
import redis
import redis.asyncio
from redis.client import EMPTY_RESPONSE, NEVER_DECODE
from redis.commands import AsyncCoreCommands, CoreCommands

from metergate.storage.keyspace import COMMANDS, CommandError, Keyspace, Status
from metergate.storage.replies import reply_error

__all__ = [
    "EmbeddedAsyncRedis",
    "EmbeddedRedis",
    "EmbeddedServer",
    "memory_server",
    "open_memory_async",
    "open_memory_sync",
]

# Commands a script may not call (as in Redis: no scripting, transactions or blocking waits).
_NOT_IN_SCRIPTS = frozenset(
    {b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"SCRIPT", b"MULTI", b"EXEC", b"DISCARD",
     b"WATCH", b"UNWATCH", b"SELECT"}
)  # fmt: skip
_NOSCRIPT = "NOSCRIPT No matching script. Please use EVAL."

# The script environment and the calls between Lua and Python, built once per runtime. `...` are
# the Python callables; everything a script can reach is in `G`, a fresh globals table whose
# metatable refuses new globals and reads of missing ones, as Redis 7's does.
_LUA_SETUP = b"""
local call, sha1hex, json_encode, json_decode, json_null = ...
local getinfo, setfenv, setmetatable, rawset, error, type, tostring, xpcall, loadstring, load =
  debug.getinfo, setfenv, setmetatable, rawset, error, type, tostring, xpcall, loadstring, load
local find, sub, gsub = string.find, string.sub, string.gsub

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

local G = {}
for _, name in ipairs({'assert', 'error', 'getmetatable', 'ipairs', 'next', 'pairs', 'pcall',
    'rawequal', 'rawget', 'rawset', 'select', 'setmetatable', 'tonumber', 'tostring', 'type',
    'unpack', 'xpcall', 'gcinfo', 'collectgarbage'}) do
  G[name] = _G[name]
end
G.string, G.table, G.math, G.coroutine = copy(string), copy(table), copy(math), copy(coroutine)
G._G = G
-- Code a script loads runs among the script's globals too, not the runtime's.
G.loadstring = function(text, name)
  local f, problem = loadstring(text, name)
  if f then setfenv(f, G) end
  return f, problem
end
G.load = function(source, name)
  local f, problem = load(source, name)
  if f then setfenv(f, G) end
  return f, problem
end
G._VERSION = _VERSION

-- An error reply in a script's hands: {err = 'CODE message'} (Redis's luaPushErrorBuff).
local function error_table(text)
  if sub(text, 1, 1) ~= '-' then text = '-' .. text end
  local space = find(text, ' ', 1, true)
  local final
  if not space then
    final = 'ERR ' .. sub(text, 2)
  else
    final = sub(text, 2, space - 1) .. ' ' .. gsub(gsub(sub(text, space + 1), '^[\\r\\n]+', ''),
      '[\\r\\n]+$', '')
  end
  return {err = final}
end

local redis = {}
-- `call` is a Python function (so a script's `return redis.call(...)` keeps its own frame, and
-- its line, as with Redis's C function); it raises the error text of an error reply.
redis.call = call
redis.pcall = function(...)
  local ok, value = pcall(call, ...)
  if ok then return value end
  return {err = tostring(value)}
end
redis.error_reply = function(text)
  if type(text) ~= 'string' then error('wrong number or type of arguments', 2) end
  return error_table(text)
end
redis.status_reply = function(text)
  if type(text) ~= 'string' then error('wrong number or type of arguments', 2) end
  return {ok = text}
end
redis.sha1hex = function(text)
  if type(text) ~= 'string' and type(text) ~= 'number' then
    error('wrong number of arguments', 2)
  end
  return sha1hex(tostring(text))
end
redis.log = function() end
redis.setresp = function(n)
  if n ~= 2 then error('the embedded backend speaks RESP2 to scripts only', 2) end
end
redis.set_repl = function() end
redis.replicate_commands = function() return true end
redis.LOG_DEBUG, redis.LOG_VERBOSE, redis.LOG_NOTICE, redis.LOG_WARNING = 0, 1, 2, 3
redis.REPL_NONE, redis.REPL_AOF, redis.REPL_SLAVE, redis.REPL_REPLICA, redis.REPL_ALL =
  0, 1, 2, 2, 3
G.redis = redis
G.cjson = {
  encode = function(value) return json_encode(value) end,
  decode = function(text) return json_decode(text) end,
  null = json_null,
}

setmetatable(G, {
  __newindex = function() error('Attempt to modify a readonly table', 2) end,
  __index = function(_, name)
    error("Script attempted to access nonexistent global variable '" .. tostring(name) .. "'", 2)
  end,
})

-- Where a script failed, as Redis's error handler finds it: the frame that raised the error or,
-- if that is a C function, its caller (frames of this chunk, which Redis has in C, are skipped).
local where, line
local function frame(level)
  local info = getinfo(level, 'Sl')
  while info and info.source == '=metergate' do
    level = level + 1
    info = getinfo(level, 'Sl')
  end
  return info, level
end
local function handler(err)
  local info, level = frame(3)
  if info and info.what == 'C' then info = frame(level + 1) end
  if type(err) == 'userdata' then
    err = {err = tostring(err)}  -- an error reply of `redis.call` (a Python exception)
  elseif type(err) ~= 'table' then
    err = {err = 'ERR ' .. tostring(err)}
  end
  if info then where, line = info.source, info.currentline end
  return err
end

local function compile(source)
  local f, problem = loadstring(source, '@user_script')
  if f == nil then return false, problem end
  setfenv(f, G)
  return f, false
end

local function run(f, keys, argv)
  rawset(G, 'KEYS', keys)
  rawset(G, 'ARGV', argv)
  where, line = nil, nil
  local ok, result = xpcall(f, handler)
  if ok then return true, result end
  local text = type(result) == 'table' and result.err or nil
  if type(text) ~= 'string' then text = 'ERR ' .. tostring(text) end
  return false, text, where, line
end

return compile, run
"""


class _CallError(Exception):
    """An error reply to `redis.call`, raised into the script (its text, as Redis words it)."""


def _error_text(text: str) -> str:
    """An error reply's text as a script sees it in `{err = ...}` (Redis's luaPushErrorBuff)."""
    code, space, message = text.partition(" ")
    if not space:
        return "ERR " + text
    return code + " " + message.strip("\r\n")


@dataclass(slots=True)
class _Script:
    """A loaded script: its source and the Lua function it compiled to."""

    source: bytes
    function: Any


def _number_arg(value: float) -> bytes:
    """A Lua number passed to `redis.call`, as Redis 7.0 turns it into an argument (`%.17g`)."""
    if isinstance(value, int) and abs(value) < 2**53:
        return b"%d" % value
    return (b"%.17g" % value).replace(b"e+0", b"e+").replace(b"e-0", b"e-")


_JSON_ESCAPES = {i: b"\\u%04x" % i for i in range(32)} | {
    0x08: b"\\b", 0x09: b"\\t", 0x0A: b"\\n", 0x0C: b"\\f", 0x0D: b"\\r",
    0x22: b'\\"', 0x5C: b"\\\\", 0x2F: b"\\/", 0x7F: b"\\u007f",
}  # fmt: skip
_JSON_TABLE = {i: _JSON_ESCAPES.get(i, bytes([i])) for i in range(256)}


def _json_string(text: bytes) -> bytes:
    """A string as Lua cjson encodes it (`/` escaped too, bytes above 127 as they are)."""
    return b'"' + b"".join(_JSON_TABLE[byte] for byte in text) + b'"'


def _no_attributes(obj: Any, name: Any, setting: bool) -> Any:
    raise AttributeError("a script cannot reach into Python objects")


class _Lua:
    """One server's Lua runtime: the script environment, and the conversions to and from Lua."""

    def __init__(self, keyspace: Keyspace) -> None:
        # A script holds one Python object, `redis.call`: no attribute of it may be read (its
        # `__self__` would lead to the whole interpreter).
        self.runtime = lua.LuaRuntime(
            encoding=None,
            unpack_returned_tuples=True,
            register_eval=False,
            register_builtins=False,
            attribute_filter=_no_attributes,
        )
        self.keyspace = keyspace
        self.table = self.runtime.table_from
        self.null = self.runtime.table()
        setup = self.runtime.compile(_LUA_SETUP, "=metergate")
        self.compile, self.run = setup(
            self.call, self.sha1hex, self.json_encode, self.json_decode, self.null
        )

    # -- from a script ---------------------------------------------------------------------

    def call(self, *args: Any) -> Any:
        """`redis.call`: the reply as Lua sees it; an error reply raises _CallError."""
        if not args:
            raise _CallError("ERR Please specify at least one argument for this redis lib call")
        command: list[bytes] = []
        for arg in args:
            if type(arg) is bytes:
                command.append(arg)
            elif type(arg) in (int, float):
                command.append(_number_arg(arg))
            else:
                raise _CallError("ERR Lua redis lib command arguments must be strings or integers")
        name = command[0].upper()
        entry = COMMANDS.get(name)
        if entry is None:
            if name in _NOT_IN_SCRIPTS:
                raise _CallError("ERR This Redis command is not allowed from script")
            raise _CallError("ERR Unknown Redis command called from script")
        handler, arity = entry
        if (arity > 0 and len(command) != arity) or len(command) < -arity:
            raise _CallError("ERR Wrong number of args calling Redis command from script")
        try:
            reply = handler(self.keyspace, command)
        except CommandError as exc:
            raise _CallError(_error_text(str(exc))) from None
        return self.to_lua(reply)

    def to_lua(self, reply: Any) -> Any:
        """A command's reply as Redis hands it to a script (nil as false, status as {ok=})."""
        kind = type(reply)
        if kind is bytes or kind is int:
            return reply
        if reply is None:
            return False
        if kind is list:
            return self.table([self.to_lua(item) for item in reply])
        if kind is Status:
            return self.table({b"ok": bytes(reply)})
        if isinstance(reply, CommandError):
            return self.table({b"err": str(reply).encode()})
        raise TypeError(f"no Lua form for {kind.__name__}")

    @staticmethod
    def sha1hex(text: bytes) -> bytes:
        return hashlib.sha1(text).hexdigest().encode()

    def json_encode(self, value: Any) -> bytes:
        """cjson.encode: numbers with 14 significant digits, an empty table as `{}`."""
        return self._encode(value, 0)

    def _encode(self, value: Any, depth: int) -> bytes:
        if depth > 1000:
            raise ValueError("Cannot serialise, excessive nesting (1001)")
        kind = type(value)
        if kind is bytes:
            return _json_string(value)
        if kind is bool:
            return b"true" if value else b"false"
        if kind in (int, float):
            if math.isinf(value) or math.isnan(value):
                raise ValueError("Cannot serialise number: must not be NaN or Inf")
            return (b"%.14g" % value).replace(b"e+0", b"e+").replace(b"e-0", b"e-")
        if value is None or value == self.null:
            return b"null"
        if lua.lua_type(value) != "table":
            raise ValueError(f"Cannot serialise {lua.lua_type(value)}: type not supported")
        items = list(value.items())
        if items and all(type(k) in (int, float) and k >= 1 and k == int(k) for k, _ in items):
            size = int(max(k for k, _ in items))
            if size <= 2 * len(items) or size <= 10:
                entries = dict(items)
                return (
                    b"["
                    + b",".join(self._encode(entries.get(i), depth + 1) for i in range(1, size + 1))
                    + b"]"
                )
            raise ValueError("Cannot serialise table: excessively sparse array")
        parts = []
        for key, item in items:
            if type(key) is bytes:
                name = key
            elif type(key) in (int, float):
                name = _number_arg(key)
            else:
                raise ValueError("Cannot serialise table: table key must be a number or string")
            parts.append(_json_string(name) + b":" + self._encode(item, depth + 1))
        return b"{" + b",".join(parts) + b"}"

    def json_decode(self, text: Any) -> Any:
        """cjson.decode: objects and arrays as tables, `null` as cjson.null."""
        if type(text) is not bytes:
            raise ValueError("bad argument #1 to 'decode' (string expected)")
        return self._from_json(json.loads(text))

    def _from_json(self, value: Any) -> Any:
        if isinstance(value, str):
            return value.encode()
        if value is None:
            return self.null
        if isinstance(value, list):
            return self.table([self._from_json(item) for item in value])
        if isinstance(value, dict):
            return self.table({k.encode(): self._from_json(v) for k, v in value.items()})
        return value

    # -- to the caller ---------------------------------------------------------------------

    def to_reply(self, value: Any) -> Any:
        """A script's result as Redis replies it (RESP2)."""
        kind = type(value)
        if kind is bytes or kind is int:
            return value
        if kind is float:
            return int(value) if math.isfinite(value) else -(2**63)
        if kind is bool:
            return 1 if value else None
        if value is None or lua.lua_type(value) != "table":
            return None
        err = value[b"err"]
        if type(err) is bytes:
            return CommandError(err.decode("utf-8", "surrogateescape"))
        ok = value[b"ok"]
        if type(ok) is bytes:
            return Status(ok)
        out: list[Any] = []
        i = 1
        while True:
            item = value[i]
            if item is None:
                return out
            out.append(self.to_reply(item))
            i += 1


class EmbeddedServer:
    """One in-process Redis: a keyspace, loaded scripts, and the lock that serialises commands."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keyspace = Keyspace()
        self.scripts: dict[bytes, _Script] = {}
        self.compilations = 0
        """How many times a script source was compiled (once per source, until SCRIPT FLUSH)."""
        self._lua: _Lua | None = None

    def execute(self, args: list[bytes]) -> Any:
        """Run one command atomically; its reply (an error reply is a CommandError instance)."""
        with self.lock:
            return self._execute(args)

    def execute_many(self, commands: list[list[bytes]], *, atomic: bool) -> list[Any]:
        """Run commands in order (all under the lock at once if `atomic`); their replies."""
        if atomic:
            with self.lock:
                return [self._execute(args) for args in commands]
        return [self.execute(args) for args in commands]

    def _execute(self, args: list[bytes]) -> Any:
        try:
            return self._dispatch(args)
        except CommandError as exc:
            return exc

    def _dispatch(self, args: list[bytes]) -> Any:
        name = args[0].upper()
        entry = COMMANDS.get(name)
        if entry is not None:
            handler, arity = entry
            if (arity > 0 and len(args) != arity) or len(args) < -arity:
                raise CommandError(
                    f"ERR wrong number of arguments for '{args[0].decode().lower()}' command"
                )
            return handler(self.keyspace, args)
        if name in (b"EVAL", b"EVALSHA") and len(args) >= 3:
            return self._eval(name, args)
        if name == b"SCRIPT" and len(args) >= 2:
            return self._script_command(args)
        shown = "".join(f"'{a.decode(errors='replace')}' " for a in args[1:])
        raise CommandError(
            f"ERR unknown command '{args[0].decode(errors='replace')}', "
            f"with args beginning with: {shown}"
        )

    @property
    def lua(self) -> _Lua:
        if self._lua is None:
            self._lua = _Lua(self.keyspace)
        return self._lua

    def _load(self, source: bytes) -> bytes:
        """Compile and keep a script (once per source); its SHA1."""
        sha = hashlib.sha1(source).hexdigest().encode()
        if sha not in self.scripts:
            function, problem = self.lua.compile(source)
            if function is False:
                raise CommandError(
                    "ERR Error compiling script (new function): "
                    + problem.decode("utf-8", "replace")
                )
            self.compilations += 1
            self.scripts[sha] = _Script(source, function)
        return sha

    def _eval(self, name: bytes, args: list[bytes]) -> Any:
        if name == b"EVAL":
            sha = self._load(args[1])
        else:
            sha = args[1].lower()
            if sha not in self.scripts:
                raise CommandError(_NOSCRIPT)
        try:
            numkeys = int(args[2])
        except ValueError:
            raise CommandError("ERR value is not an integer or out of range") from None
        if numkeys > len(args) - 3:
            raise CommandError("ERR Number of keys can't be greater than number of args")
        if numkeys < 0:
            raise CommandError("ERR Number of keys can't be negative")
        lua_ = self.lua
        keys = lua_.table(args[3 : 3 + numkeys])
        argv = lua_.table(args[3 + numkeys :])
        outcome = lua_.run(self.scripts[sha].function, keys, argv)
        if outcome[0] is True:
            reply = lua_.to_reply(outcome[1])
            if isinstance(reply, CommandError):
                raise reply
            return reply
        _, text, where, line = outcome
        message = text.decode("utf-8", "surrogateescape")
        if where is not None:
            message += f" script: {sha.decode()}, on {where.decode()}:{line}."
        raise CommandError(message)

    def _script_command(self, args: list[bytes]) -> Any:
        sub = args[1].upper()
        if sub == b"LOAD" and len(args) == 3:
            return self._load(args[2])
        if sub == b"FLUSH" and len(args) <= 3:
            self.scripts.clear()
            return Status(b"OK")
        if sub == b"EXISTS" and len(args) >= 3:
            return [int(sha.lower() in self.scripts) for sha in args[2:]]
        raise CommandError(f"ERR unknown subcommand '{args[1].decode(errors='replace')}'.")


# -- clients -------------------------------------------------------------------------------


def _for_client(reply: Any, decode: bool) -> Any:
    """A reply as redis-py's parser gives it: text decoded (if asked), nested errors as
    exceptions."""
    kind = type(reply)
    if kind is bytes:
        return reply.decode("utf-8", "surrogateescape") if decode else reply
    if kind is Status:
        return reply.decode("utf-8", "surrogateescape") if decode else bytes(reply)
    if kind is list:
        return [_for_client(item, decode) for item in reply]
    if kind is CommandError:
        return reply_error(str(reply))
    return reply


class _Client:
    """What the sync and asyncio clients share: encoding a command, parsing its reply."""

    server: EmbeddedServer
    response_callbacks: Any
    get_encoder: Callable[[], Any]

    def _args(self, args: tuple[Any, ...]) -> list[bytes]:
        """The command as bytes, as redis-py sends it (`SCRIPT LOAD` as two words)."""
        first = args[0]
        out = (first.encode() if isinstance(first, str) else bytes(first)).split()
        encode = None
        for arg in args[1:]:
            kind = type(arg)
            if kind is str:
                out.append(arg.encode())
            elif kind is bytes:
                out.append(arg)
            elif kind is int:
                out.append(b"%d" % arg)
            else:  # floats, memoryviews, and the types redis-py refuses (DataError)
                if encode is None:
                    encode = self.get_encoder().encode
                out.append(encode(arg))
        return out

    def _parse(self, command_name: Any, reply: Any, options: dict[str, Any]) -> Any:
        if isinstance(reply, CommandError):
            if EMPTY_RESPONSE in options:
                return options[EMPTY_RESPONSE]
            raise reply_error(str(reply))
        reply = _for_client(
            reply, NEVER_DECODE not in options and self.get_encoder().decode_responses
        )
        options = {k: v for k, v in options.items() if k not in (EMPTY_RESPONSE, NEVER_DECODE)}
        options.pop("keys", None)
        name = command_name.decode() if isinstance(command_name, bytes) else command_name
        if name in self.response_callbacks:
            return self.response_callbacks[name](reply, **options)
        return reply


class EmbeddedRedis(_Client, redis.Redis):
    """A redis-py client of an embedded server (every command method, pipelines too)."""

    def __init__(self, server: EmbeddedServer, *, decode_responses: bool = True) -> None:
        super().__init__(decode_responses=decode_responses, protocol=2)
        self.server = server

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of an embedded server>"

    def execute_command(self, *args: Any, **options: Any) -> Any:
        """Run one command on the server and parse its reply as redis-py does."""
        return self._parse(args[0], self.server.execute(self._args(args)), options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        """Commands queued and run together (a transaction: atomically)."""
        return EmbeddedPipeline(self, transaction)  # type: ignore[abstract]


class EmbeddedAsyncRedis(_Client, redis.asyncio.Redis):  # type: ignore[misc]
    """A redis-py asyncio client of an embedded server (commands run at once, under its lock)."""

    def __init__(self, server: EmbeddedServer, *, decode_responses: bool = True) -> None:
        super().__init__(decode_responses=decode_responses, protocol=2)
        self.server = server

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of an embedded server>"

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """Run one command on the server and parse its reply as redis-py does."""
        return self._parse(args[0], self.server.execute(self._args(args)), options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        """Commands queued and run together (a transaction: atomically)."""
        return EmbeddedAsyncPipeline(self, transaction)  # type: ignore[abstract]


class _PipelineBase:
    """Queued commands of a pipeline, run by `execute` (replies in order)."""

    def __init__(self, client: EmbeddedRedis | EmbeddedAsyncRedis, transaction: bool) -> None:
        self.client = client
        self.transaction = transaction
        self.command_stack: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.response_callbacks = client.response_callbacks

    def get_encoder(self) -> Any:
        return self.client.get_encoder()

    def __len__(self) -> int:
        return len(self.command_stack)

    def reset(self) -> None:
        self.command_stack = []

    def _run(self, raise_on_error: bool) -> list[Any]:
        stack, self.command_stack = self.command_stack, []
        client = self.client
        replies = client.server.execute_many(
            [client._args(args) for args, _ in stack], atomic=self.transaction
        )
        out = []
        for (args, options), reply in zip(stack, replies, strict=True):
            try:
                out.append(client._parse(args[0], reply, dict(options)))
            except redis.ResponseError as exc:
                out.append(exc)
        if raise_on_error:
            for item in out:
                if isinstance(item, redis.ResponseError):
                    raise item
        return out


class EmbeddedPipeline(_PipelineBase, CoreCommands):  # type: ignore[misc]
    """A pipeline of an embedded server's sync client."""

    def execute_command(self, *args: Any, **options: Any) -> EmbeddedPipeline:
        self.command_stack.append((args, options))
        return self

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Run the queued commands; their replies in order."""
        return self._run(raise_on_error)

    def __enter__(self) -> EmbeddedPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reset()


class EmbeddedAsyncPipeline(_PipelineBase, AsyncCoreCommands):  # type: ignore[misc]
    """A pipeline of an embedded server's asyncio client."""

    def execute_command(self, *args: Any, **options: Any) -> EmbeddedAsyncPipeline:
        self.command_stack.append((args, options))
        return self

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Run the queued commands; their replies in order."""
        return self._run(raise_on_error)

    async def __aenter__(self) -> EmbeddedAsyncPipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.reset()


_servers: dict[str, EmbeddedServer] = {}
_servers_lock = threading.Lock()


def memory_server(url: str) -> EmbeddedServer:
    """The one in-process server of a `memory://` URL, made on first use."""
    with _servers_lock:
        server = _servers.get(url)
        if server is None:
            server = _servers[url] = EmbeddedServer()
        return server


def open_memory_sync(url: str) -> EmbeddedRedis:
    """A blocking redis-py client of the URL's server (replies decoded)."""
    return EmbeddedRedis(memory_server(url))


def open_memory_async(url: str) -> EmbeddedAsyncRedis:
    """An asyncio redis-py client of the URL's server (replies decoded)."""
    return EmbeddedAsyncRedis(memory_server(url))
