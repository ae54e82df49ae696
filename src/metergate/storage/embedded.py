"""The embedded backend (`memory://`): fakeredis running the Lua scripts in-process, compiled once.

fakeredis 2.40 answers EVALSHA by looking the source up by its SHA1, hashing it again and handing it
to `LuaRuntime.execute`, which parses and compiles the whole source (lib.lua included, ~30 KB)
before running it: over half of an admission's time. Here EVAL and EVALSHA keep, per server, the
Lua function each source compiles to and call that function again on the next run, everything
else as fakeredis does it: fresh KEYS/ARGV tables, the script's environment set back to
the globals (as a freshly loaded chunk gets), the per-script RESP mode, the same error replies
(a source that does not compile is left to fakeredis's own EVAL, for its wording), the full
garbage collection after each script, NOSCRIPT once SCRIPT FLUSH has dropped the source.

Two smaller per-call costs go too. fakeredis checks that a script created no global variable
before every `redis.call` by copying the names of all globals into a Python set; one Lua loop does
it here, and only when it finds a new global does fakeredis's own check run, to raise its error.
And fakeredis parses each request by cutting lines off the front of a buffer in Python; a complete,
well-formed request is read here by offsets, giving the same fields.

The overrides live in subclasses of fakeredis's socket and connection classes, used only by the
clients made here: plain fakeredis clients in the same process are untouched. They copy parts of
fakeredis's code, so they are used only with the fakeredis releases they were checked against (and
the Lua 5.1 runtime fakeredis uses by default); with any other, the clients made here are plain
fakeredis clients, which behave the same, only slower.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, cast

import fakeredis
from fakeredis import _msgs as msgs
from fakeredis._clients._async import FakeReader, FakeWriter
from fakeredis._commands import COMMANDS_WITH_SUB
from fakeredis._helpers import SimpleError, decode_command_bytes
from fakeredis._socket import AsyncFakeSocket, FakeSocket
from fakeredis.commands_mixins import scripting_mixin

__all__ = [
    "CACHES_SCRIPTS",
    "EmbeddedServer",
    "memory_server",
    "open_memory_async",
    "open_memory_sync",
]

# The fakeredis releases whose EVAL/EVALSHA code the overrides below were compared with.
VERIFIED_FAKEREDIS = ("2.40.",)

CACHES_SCRIPTS: bool = fakeredis.__version__.startswith(VERIFIED_FAKEREDIS) and (
    scripting_mixin.LUA_VERSION == "5.1"  # the function-environment reset below is Lua 5.1's
)
"""Whether the clients made here compile each script once (else they are plain fakeredis)."""

_LUA_ERROR: type[Exception] = scripting_mixin.LUA_MODULE.LuaError
_LUA_SYNTAX_ERROR: type[Exception] = scripting_mixin.LUA_MODULE.LuaSyntaxError

# `next`, `getfenv` and `setfenv` are captured when the helpers are made, so a script that
# reassigns those globals cannot change what the helpers do.
_LUA_HELPERS = b"""
local next, getfenv, setfenv = next, getfenv, setfenv
local function has_new_global(expected)
    for name in next, getfenv(0) do
        if expected[name] == nil then
            return true
        end
    end
    return false
end
local function reset_env(f)
    setfenv(f, getfenv(0))
end
return has_new_global, reset_env
"""


@dataclass(slots=True)
class _Compiled:
    """One script source, its SHA1 and the Lua function it compiles to."""

    source: bytes
    sha: bytes
    function: Any


class _CompiledScripts:
    """The compiled scripts of one server's Lua runtime, and the Lua helpers that run them.

    Always used under the server's lock (fakeredis takes it around every command)."""

    def __init__(
        self, runtime: Any, expected_globals: set[Any], script_cache: dict[bytes, bytes]
    ) -> None:
        self.runtime = runtime
        self.expected_globals = expected_globals
        self._expected_table = runtime.table_from(dict.fromkeys(expected_globals, True))
        self._has_new_global, self.reset_env = runtime.execute(_LUA_HELPERS)
        # The same chunk fakeredis executes after every script, compiled once: it still looks
        # `collectgarbage` up among the globals on each run, as executing the source would.
        self.collect_garbage = runtime.compile(b"collectgarbage()")
        self._scripts: dict[bytes, _Compiled] = {}
        # SCRIPT FLUSH replaces the server's script cache with a new dict, whichever client sends
        # it: a different dict means every compiled script may be gone.
        self._script_cache = script_cache

    def __len__(self) -> int:
        """How many compiled scripts are kept."""
        return len(self._scripts)

    def check_globals(self) -> None:
        """Raise fakeredis's error when the script created a global variable."""
        if self._has_new_global(self._expected_table):
            scripting_mixin._check_for_lua_globals(self.runtime, self.expected_globals)

    def forget(self, script_cache: dict[bytes, bytes] | None = None) -> None:
        """Drop every compiled script (after SCRIPT FLUSH)."""
        self._scripts.clear()
        if script_cache is not None:
            self._script_cache = script_cache

    def get(self, sha: bytes, source: bytes, script_cache: dict[bytes, bytes]) -> _Compiled | None:
        """The compiled `source` (stored under `sha`); None when it does not compile."""
        if script_cache is not self._script_cache:
            self.forget(script_cache)
        compiled = self._scripts.get(sha)
        if compiled is not None:
            if compiled.source is source:
                return compiled
            if compiled.source == source:
                compiled.source = source  # the next call is likely to bring this same object
                return compiled
        try:
            function = self.runtime.compile(source)
        except _LUA_SYNTAX_ERROR:
            # fakeredis words a syntax error differently ("error loading code: ..."): its own
            # EVAL runs such a script, and nothing is kept.
            return None
        compiled = _Compiled(source, hashlib.sha1(source).hexdigest().encode(), function)
        self._scripts[sha] = compiled
        return compiled


class EmbeddedServer(fakeredis.FakeServer):
    """A fakeredis server that also holds the compiled scripts of its Lua runtime."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compiled_scripts: _CompiledScripts | None = None


class _EmbeddedSocketMixin:
    """EVAL and EVALSHA on compiled functions kept per server, `redis.call` with the Lua check for
    new globals, and the request parser's fast path; the rest as fakeredis does it.

    Mixed in ahead of fakeredis's socket classes, whose attributes the methods below use."""

    _server: Any
    _paused: bool
    _fieldsets: dict[bytes, Any]
    _script_resp: int | None
    version: tuple[int, ...]
    server_type: str

    def _compiled_scripts(self) -> _CompiledScripts | None:
        """The server's compiled scripts (None on a server that keeps none)."""
        server = self._server
        if not isinstance(server, EmbeddedServer):
            return None
        runtime = self._get_server_runtime(server)  # type: ignore[attr-defined]
        cache = server.compiled_scripts
        if cache is None or cache.runtime is not runtime:
            # fakeredis keeps the names of the runtime's own globals on the server.
            expected_globals: set[Any] = getattr(server, "_lua_expected_globals")  # noqa: B009
            cache = server.compiled_scripts = _CompiledScripts(
                runtime, expected_globals, server.script_cache
            )
        return cache

    def eval(self, script: bytes, numkeys: int, *keys_and_args: bytes) -> Any:
        """EVAL: as fakeredis, with the source compiled once per server."""
        cache = self._compiled_scripts()
        if cache is None:
            return super().eval(script, numkeys, *keys_and_args)  # type: ignore[misc]
        if numkeys > len(keys_and_args):
            raise SimpleError(msgs.TOO_MANY_KEYS_MSG)
        if numkeys < 0:
            raise SimpleError(msgs.NEGATIVE_KEYS_MSG)
        sha1 = hashlib.sha1(script).hexdigest().encode()
        self._server.script_cache[sha1] = script
        compiled = cache.get(sha1, script, self._server.script_cache)
        if compiled is None:
            return super().eval(script, numkeys, *keys_and_args)  # type: ignore[misc]
        return self._run(cache, compiled, numkeys, keys_and_args)

    def evalsha(self, sha1: bytes, numkeys: int, *keys_and_args: bytes) -> Any:
        """EVALSHA: as fakeredis (NOSCRIPT for an unknown SHA1), without compiling again."""
        cache = self._compiled_scripts()
        if cache is None:
            return super().evalsha(sha1, numkeys, *keys_and_args)  # type: ignore[misc]
        script_cache = self._server.script_cache
        try:
            script = script_cache[sha1]
        except KeyError:
            raise SimpleError(msgs.NO_MATCHING_SCRIPT_MSG) from None
        if numkeys > len(keys_and_args):
            raise SimpleError(msgs.TOO_MANY_KEYS_MSG)
        if numkeys < 0:
            raise SimpleError(msgs.NEGATIVE_KEYS_MSG)
        compiled = cache.get(sha1, script, script_cache)
        if compiled is None:
            return super().eval(script, numkeys, *keys_and_args)  # type: ignore[misc]
        # fakeredis's EVALSHA stores the source again under the SHA1 it hashes to.
        script_cache[compiled.sha] = script
        return self._run(cache, compiled, numkeys, keys_and_args)

    def script_flush(self, *args: bytes) -> Any:
        """SCRIPT FLUSH: forget the compiled scripts along with the sources."""
        reply = super().script_flush(*args)  # type: ignore[misc]
        server = self._server
        if isinstance(server, EmbeddedServer) and server.compiled_scripts is not None:
            server.compiled_scripts.forget(server.script_cache)
        return reply

    def _run(
        self,
        cache: _CompiledScripts,
        compiled: _Compiled,
        numkeys: int,
        keys_and_args: tuple[bytes, ...],
    ) -> Any:
        """Run a compiled script: the body of fakeredis's EVAL, the function in place of the source."""
        server = self._server
        runtime = cache.runtime
        server._lua_current_socket[0] = self
        self._script_resp = 2
        caller_fieldsets, self._fieldsets = self._fieldsets, {}
        server._lua_set_keys_argv(
            runtime.table_from(keys_and_args[:numkeys]),
            runtime.table_from(keys_and_args[numkeys:]),
        )
        # Executing the source made a new function each time, in the current globals: a script
        # that changed its own environment (setfenv) must not pass that on to the next call.
        cache.reset_env(compiled.function)
        try:
            result = compiled.function()
        except SimpleError as ex:
            error_msg = ex.value
            if error_msg == msgs.LUA_COMMAND_ARG_MSG:
                error_msg = scripting_mixin._get_lua_bad_command_arg_msg(
                    server.server_type, self.version
                )
            elif self.version < (7,):
                error_msg = msgs.SCRIPT_ERROR_MSG.format(compiled.sha.decode(), error_msg)
            if self.server_type == "dragonfly":
                error_msg = msgs.DRAGONFLY_SCRIPT_ERROR_MSG.format(compiled.sha.decode(), error_msg)
            raise SimpleError(error_msg) from None
        except _LUA_ERROR as ex:
            if self.server_type == "dragonfly":
                raise SimpleError(
                    msgs.DRAGONFLY_SCRIPT_ERROR_MSG.format(compiled.sha.decode(), ex)
                ) from None
            raise SimpleError(msgs.SCRIPT_ERROR_MSG.format(compiled.sha.decode(), ex)) from None
        finally:
            self._script_resp = None
            self._fieldsets = caller_fieldsets
            cache.collect_garbage()
        cache.check_globals()
        return self._convert_lua_result(result, nested=False)  # type: ignore[attr-defined]

    def _parse_commands(self) -> Generator[None, bytes, None]:
        """fakeredis's request parser, with a fast path for a whole, well-formed command.

        fakeredis cuts every line and every argument off the front of the buffer in Python, a
        sixth of an admission's EVALSHA (~70 lines). When the buffer holds a complete command
        whose lines are all well formed, `_whole_command` reads it by offsets instead, which
        gives the same fields; anything else (a partial command, a malformed line) goes through
        fakeredis's own steps below, unchanged, so it waits and fails exactly as fakeredis does."""
        buf = b""
        while True:
            while self._paused or b"\n" not in buf:
                buf += yield
            whole = _whole_command(buf)
            if whole is not None:
                fields, end = whole
                buf = buf[end:]
                self._process_command(fields)  # type: ignore[attr-defined]
                continue
            # fakeredis's BaseFakeSocket._parse_commands, one command.
            line, buf = self._extract_line(buf)  # type: ignore[attr-defined]
            if not line[:1] == b"*":  # array
                raise self._unknown_command(buf.decode().strip())  # type: ignore[attr-defined]
            n_fields = int(line[1:-2])
            fields = []
            for _ in range(n_fields):
                while b"\n" not in buf:
                    buf += yield
                line, buf = self._extract_line(buf)  # type: ignore[attr-defined]
                if line[:1] != b"$":
                    raise self._unknown_command(buf.decode().strip())  # type: ignore[attr-defined]
                length = int(line[1:-2])
                while len(buf) < length + 2:
                    buf += yield
                fields.append(buf[:length])
                buf = buf[length + 2 :]  # +2 to skip the CRLF
            self._process_command(fields)  # type: ignore[attr-defined]

    def _lua_redis_call(
        self, lua_runtime: Any, expected_globals: set[Any], op: bytes, *args: Any
    ) -> Any:
        """`redis.call` from a script: fakeredis's, with the faster check for new globals."""
        cache = getattr(self._server, "compiled_scripts", None)
        if cache is None or cache.runtime is not lua_runtime:
            return super()._lua_redis_call(lua_runtime, expected_globals, op, *args)  # type: ignore[misc]
        cache.check_globals()
        cmd = decode_command_bytes(op)
        if cmd in COMMANDS_WITH_SUB and args:
            cmd += " " + decode_command_bytes(scripting_mixin._convert_redis_arg(args[0]))
            args = args[1:]
        func, sig = self._name_to_func(cmd)  # type: ignore[attr-defined]
        if func is None:
            raise SimpleError(msgs.WRONG_ARGS_MSG7)
        # Most arguments reach here as bytes already, which fakeredis's conversion returns as is.
        convert = scripting_mixin._convert_redis_arg
        new_args = [arg if type(arg) is bytes else convert(arg) for arg in args]
        result = self._run_command(func, sig, new_args, True)  # type: ignore[attr-defined]
        return self._convert_redis_result(lua_runtime, result)  # type: ignore[attr-defined]


# The length lines of a command's arguments, joined by CRLF: `$<digits>` each.
_LENGTH_LINES = re.compile(rb"\$[0-9]+(?:\r\n\$[0-9]+)*")


def _whole_command(buf: bytes) -> tuple[list[bytes], int] | None:
    """The fields of the command at the start of `buf` and the offset after it, when `buf` holds
    all of it in the plain form clients send (`*<n>` CRLF, then `$<digits>` CRLF `<argument>` CRLF
    for each argument, no argument containing CRLF); else None.

    For such a command fakeredis's parser reads the same fields: each of its lines ends at the
    first LF, which is the CRLF after `*<n>` or `$<digits>`, and each argument is `<digits>`
    bytes long. An argument holding a CRLF is split short here, so its length never matches and
    the command is left to fakeredis's parser."""
    nl = buf.find(b"\n")
    if nl < 2 or buf[0] != 42 or buf[nl - 1] != 13:  # 42: "*", 13: CR
        return None
    try:
        n_fields = int(buf[1 : nl - 1])
    except ValueError:
        return None
    if n_fields <= 0:
        return [], nl + 1  # fakeredis reads no field either
    # Split no further than this command's lines: the rest of the buffer stays in one piece.
    parts = buf[nl + 1 :].split(b"\r\n", 2 * n_fields)
    if len(parts) <= 2 * n_fields:
        return None  # not all there yet
    length_lines = b"\r\n".join(parts[0 : 2 * n_fields : 2])
    fields = parts[1 : 2 * n_fields : 2]
    lengths = list(map(len, fields))
    if _LENGTH_LINES.fullmatch(length_lines) is None:
        return None
    if list(map(int, length_lines[1:].split(b"\r\n$"))) != lengths:
        return None
    # The array line, the length lines and their CRLFs, the arguments and theirs.
    return fields, nl + 1 + len(length_lines) + 2 + sum(lengths) + 2 * n_fields


class _EmbeddedSocket(_EmbeddedSocketMixin, FakeSocket):  # type: ignore[misc]
    """fakeredis's socket (sync clients) with the overrides above."""


class _EmbeddedAsyncSocket(_EmbeddedSocketMixin, AsyncFakeSocket):  # type: ignore[misc]
    """fakeredis's socket (asyncio clients) with the overrides above."""


class _EmbeddedConnection(fakeredis.FakeRedisConnection):
    """fakeredis's sync connection, on the socket above."""

    def _connect(self) -> FakeSocket:
        # fakeredis's _connect, with the socket class replaced.
        server = cast(fakeredis.FakeServer, self._server)  # set when the connection is made
        if not server.connected:
            raise self._connection_error_class(msgs.CONNECTION_ERROR_MSG)
        return _EmbeddedSocket(
            server,
            client_class=self._client_class,
            db=self.db,
            lua_modules=self._lua_modules,
            client_info=self._client_info,
        )


class _EmbeddedAsyncConnection(fakeredis.FakeAsyncRedisConnection):
    """fakeredis's asyncio connection, on the socket above."""

    async def _connect(self) -> None:
        # fakeredis's _connect, with the socket class replaced.
        server = cast(fakeredis.FakeServer, self._server)  # set when the connection is made
        if not server.connected:
            raise self._connection_error_class(msgs.CONNECTION_ERROR_MSG)
        self._sock = _EmbeddedAsyncSocket(
            server,
            self.db,
            client_class=self._client_class,
            lua_modules=self._lua_modules,
            client_info=self._client_info,
        )
        self._reader = FakeReader(self._sock)
        self._writer = FakeWriter(self._sock)


_servers: dict[str, EmbeddedServer] = {}
_servers_lock = threading.Lock()


def memory_server(url: str) -> EmbeddedServer:
    """The one in-process server of a `memory://` URL, made on first use."""
    with _servers_lock:
        server = _servers.get(url)
        if server is None:
            server = _servers[url] = EmbeddedServer()
        return server


def open_memory_sync(url: str) -> Any:
    """A blocking client (fakeredis.FakeRedis, replies decoded) of the URL's server."""
    options: dict[str, Any] = {"server": memory_server(url), "decode_responses": True}
    if CACHES_SCRIPTS:
        options["connection_class"] = _EmbeddedConnection
    return fakeredis.FakeRedis(**options)


def open_memory_async(url: str) -> Any:
    """An asyncio client (fakeredis.FakeAsyncRedis, replies decoded) of the URL's server."""
    options: dict[str, Any] = {"server": memory_server(url), "decode_responses": True}
    if CACHES_SCRIPTS:
        options["connection_class"] = _EmbeddedAsyncConnection
    return fakeredis.FakeAsyncRedis(**options)
