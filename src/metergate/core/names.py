"""Names of customers, metrics, plans and balances: the one rule, and their form inside keys.

A name is a string of 1 to 200 characters without control characters; anything else (`:`, `{`,
`}`, `%`, spaces, any script) is allowed. Inside a storage key each name is escaped, so that the
`:` joining the parts of a key and the `{...}` of a Cluster hash tag are never a name's own
characters: two different names never give one key, and a name never moves a key's slot.
"""

from __future__ import annotations

import re

from metergate.core.errors import InvalidAmount

__all__ = ["MAX_NAME_LENGTH", "check_name", "key_part", "name_problem"]

MAX_NAME_LENGTH = 200

# C0 controls, DEL and C1 controls: invisible in logs and dashboards, and the separator (US, \x1f)
# the scripts put between names in set members.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Lone surrogates are not characters: they cannot be encoded, so they cannot be stored.
_SURROGATE = re.compile("[\ud800-\udfff]")
# Either of the two: one search clears the common, valid name.
_ANY_BAD = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# `%` first, so an escaped name never reads as another name's escape.
_SPECIAL = re.compile(r"[%:{}]")
_ESCAPES = {"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"}


def name_problem(value: object) -> str | None:
    """Return why `value` is not a valid name, or None when it is one."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not 1 <= len(value) <= MAX_NAME_LENGTH:
        return f"must be 1 to {MAX_NAME_LENGTH} characters long, not {len(value)}"
    if _ANY_BAD.search(value) is None:
        return None
    if _CONTROL.search(value):
        return "must not contain control characters"
    if _SURROGATE.search(value):
        return "must be valid Unicode (a lone surrogate is not a character)"
    return None


def check_name(value: object, field: str) -> str:
    """Return `value` if it is a valid name; raise InvalidAmount naming `field` otherwise."""
    problem = name_problem(value)
    if problem is not None:
        raise InvalidAmount(field, problem)
    return value  # type: ignore[return-value]


def key_part(name: str) -> str:
    """Return a name as it appears inside a storage key (injective: `%`, `:`, `{`, `}` escaped)."""
    if _SPECIAL.search(name) is None:
        return name  # the common case: the key keeps the name as it is
    return _SPECIAL.sub(lambda m: _ESCAPES[m.group()], name)
