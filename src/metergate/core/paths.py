"""Request paths normalized before routes match them (sans-I/O), as envoy's `normalize_path`
and `merge_slashes` do.

RFC 3986: percent-encoded unreserved characters are decoded and the other escapes upper-cased
(section 6.2.2), repeated slashes are merged, and dot segments are removed (section 5.2.4).
A gateway that matched `/x/../v1/hello` as written while the upstream resolved it to `/v1/hello`
would forward unmetered what it meters under its normal name; so routes match the normalized
path and the proxy forwards that same path. What cannot be normalized without guessing how the
upstream reads it is refused: an encoded slash or backslash, a backslash, a NUL, or `..` that
climbs above the root.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

from metergate.core.http import Answer, problem

__all__ = [
    "BadPath",
    "NormalPath",
    "bad_request",
    "normal_scope",
    "normalize",
    "normalize_decoded",
]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%(..)?", re.DOTALL)
_HEX = re.compile(r"[0-9A-Fa-f]{2}")
_SLASHES = re.compile(r"//+")
# Nothing to do for a path without any of these (the common case costs one scan).
_SUSPECT = re.compile(r"%|//|/\.|\\|\x00")
_SUSPECT_BYTES = re.compile(rb"%|//|/\.|\\|\x00")
# The characters a path may hold as they are (RFC 3986 pchar and "/"); the rest is escaped.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


class BadPath(ValueError):
    """The path cannot be normalized; the message says why."""


class NormalPath(NamedTuple):
    """A normalized path: `raw` (still percent-encoded, what is forwarded) and `path` (decoded,
    what routes match)."""

    raw: str
    path: str


def _decode_unreserved(match: re.Match[str]) -> str:
    pair = match.group(1)
    if pair is None or not _HEX.fullmatch(pair):
        raise BadPath("the path holds a '%' that is not followed by two hex digits")
    byte = int(pair, 16)
    if byte in (0x2F, 0x5C):
        raise BadPath("the path holds an encoded slash or backslash")
    if byte == 0:
        raise BadPath("the path holds a NUL")
    if byte in _UNRESERVED:
        return chr(byte)
    return "%" + pair.upper()


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 on an absolute path, refusing `..` above the root."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for segment in segments:
        if segment == ".":
            continue
        if segment == "..":
            if not out:
                raise BadPath("the path climbs above the root")
            out.pop()
            continue
        out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")  # `/a/b/..` is the directory `/a/`
    return "/" + "/".join(out)


def _normalize(path: str) -> str:
    if not path.startswith("/"):
        raise BadPath("the path must start with '/'")
    if "\\" in path:
        raise BadPath("the path holds a backslash")
    if "\x00" in path:
        raise BadPath("the path holds a NUL")
    return _remove_dot_segments(_SLASHES.sub("/", path))


def normalize(raw: str) -> NormalPath:
    """Normalize a path as received (percent-encoded); raise BadPath when it cannot be."""
    if _SUSPECT.search(raw) is None and raw.startswith("/"):
        return NormalPath(raw, raw)
    if not raw.startswith("/"):
        raise BadPath("the path must start with '/'")
    decoded = _ESCAPE.sub(_decode_unreserved, raw)
    encoded = _normalize(decoded)
    # Only reserved and non-ASCII escapes are left, none of them '/': decoding makes no segment.
    return NormalPath(encoded, unquote(encoded))


def normalize_decoded(path: str) -> str:
    """Normalize a path whose escapes were already decoded (WSGI's PATH_INFO, say)."""
    if _SUSPECT.search(path) is None and path.startswith("/"):
        return path
    return unquote(normalize(quote(path, safe=_PATH_SAFE)).raw)


def normal_scope(scope: dict[str, Any]) -> dict[str, Any]:
    """Return an ASGI HTTP scope whose `path` and `raw_path` are normalized (BadPath if not)."""
    raw_path = scope.get("raw_path")
    if raw_path is not None and raw_path[:1] == b"/" and _SUSPECT_BYTES.search(raw_path) is None:
        return scope  # the common case, decided on the bytes as they came
    if raw_path is None:
        path = normalize_decoded(scope["path"])
        return scope if path == scope["path"] else {**scope, "path": path}
    raw = raw_path.decode("latin-1")
    normal = normalize(raw)
    if normal.raw == raw:
        return scope
    return {**scope, "path": normal.path, "raw_path": normal.raw.encode("latin-1")}


def bad_request(exc: BadPath) -> Answer:
    """Return the 400 `bad-request` problem for a path that cannot be normalized."""
    return problem("bad-request", 400, str(exc))
