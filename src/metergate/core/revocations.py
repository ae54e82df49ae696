"""How API-key revocations reach every process's key cache (sans-I/O).

Revoking a key deletes its hash and increments one counter in storage (`Keys.revocations`). Each
process remembers the highest count it has read: the process that revoked knows the new count at
once, and every key lookup reads the counter together with the key, so a key cache trusts its
entries only while they carry the count last read, and only for `CHECK_S` after the last read.
Another process therefore stops serving a revoked key within `CHECK_S` (plus one round trip),
on the embedded backend, Redis and Cluster alike: a counter needs no pub/sub.
"""

from __future__ import annotations

__all__ = ["CHECK_S", "Revocations"]

CHECK_S = 0.5
"""How long a key cache trusts what it read from storage before reading the counter again."""


class Revocations:
    """The revocation count this process has seen; a change makes every cached key stale."""

    def __init__(self) -> None:
        self.version = 0

    def observe(self, value: object) -> bool:
        """Take a count read from storage; return False when it is older than one already seen.

        A lookup whose count is older raced a revocation: its answer may name a revoked key's
        customer, so it must not be trusted (the caller reads again).
        """
        version = int(value) if isinstance(value, (int, str, bytes)) and value else 0
        if version < self.version:
            return False
        self.version = version
        return True
