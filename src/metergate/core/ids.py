"""ULIDs: 48 bits of milliseconds then 80 random bits, in Crockford's base32 (26 characters)."""

from __future__ import annotations

import secrets

__all__ = ["new_ulid"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_ulid(now_ms: int) -> str:
    """Return a new ULID for the instant `now_ms` (sortable by time, unique by its random part)."""
    value = (now_ms & ((1 << 48) - 1)) << 80 | secrets.randbits(80)
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))
