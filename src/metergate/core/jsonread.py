"""A strict JSON reader for request bodies (sans-I/O): no duplicate keys, bounded nesting.

Python's `json` keeps the last of two equal keys (`{"amount":1,"amount":99999}` reads as 99,999,
where another reader of the same bytes sees 1) and recurses once per level (100,000 `[` raise
RecursionError). This reader refuses both, with a message naming the problem.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["MAX_DEPTH", "JSONRefused", "canonical", "read_json"]

MAX_DEPTH = 32

# A whole string (skipped: brackets inside it do not nest) or one bracket.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class JSONRefused(ValueError):
    """The body is not JSON this reader accepts; the message says why."""


def _depth_problem(text: str, max_depth: int) -> str | None:
    depth = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
        elif token in "]}":
            depth -= 1
    return None


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JSONRefused(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_json(raw: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON, refusing duplicate keys and nesting deeper than `max_depth` (JSONRefused)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise JSONRefused("not UTF-8 JSON") from None
    problem = _depth_problem(text, max_depth)
    if problem is not None:
        raise JSONRefused(problem)
    try:
        return json.loads(text, object_pairs_hook=_unique)
    except json.JSONDecodeError as exc:
        raise JSONRefused(f"not JSON: {exc.msg}") from None


def canonical(value: Any) -> bytes:
    """Return one byte form of a parsed JSON value (sorted keys, no spaces), for fingerprints."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
