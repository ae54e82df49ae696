"""The Lua scripts, read once from the package: each is the shared library followed by its body."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

__all__ = ["SCRIPT_NAMES", "LuaScript", "load_script"]

SCRIPT_NAMES = ("admit", "asset", "balance", "customer", "refund")


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A script's full source and its SHA1 (the EVALSHA handle)."""

    name: str
    source: str
    sha: str


@cache
def load_script(name: str) -> LuaScript:
    """Return a script by name, with the shared library prepended."""
    lua = files("metergate") / "lua"
    source = (lua / "lib.lua").read_text("utf-8") + "\n" + (lua / f"{name}.lua").read_text("utf-8")
    return LuaScript(name, source, hashlib.sha1(source.encode()).hexdigest())
