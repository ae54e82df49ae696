"""Redis key names: every key of one customer carries its partition's hash tag (one Cluster slot).

Names inside keys go through `key_part`, which escapes `%`, `:`, `{` and `}`: the parts of a key
are joined with `:`, so two different (customer, metric, balance) tuples never share a key, and
the partition's tag is the only `{...}` a key holds.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from metergate.core.names import key_part

__all__ = ["Keys"]


@dataclass(frozen=True, slots=True)
class Keys:
    """Builds the key names under one prefix, partitioning customers into `partitions` slots."""

    prefix: str = "mg"
    partitions: int = 64

    def partition(self, customer: str) -> int:
        """Return the partition number of a customer (stable across processes and restarts)."""
        return zlib.crc32(customer.encode()) % self.partitions

    def tag(self, customer: str) -> str:
        """Return the hash-tagged stem shared by all keys of the customer's partition."""
        return f"{{{self.prefix}:p{self.partition(customer)}}}"

    def outbox(self, partition: int) -> str:
        """Return the outbox stream of one partition."""
        return f"{{{self.prefix}:p{partition}}}:outbox"

    def holds(self, partition: int) -> str:
        """Return the zset of a partition's balances with open holds, by earliest expiry."""
        return f"{{{self.prefix}:p{partition}}}:holds"

    def dead_letters(self, partition: int) -> str:
        """Return the stream of a partition's events given up on, one entry per destination."""
        return f"{{{self.prefix}:p{partition}}}:dead"

    def usage_window(self, partition: int, window_start_ms: int) -> str:
        """Return the hash aggregating one partition's usage in one report window."""
        return f"{{{self.prefix}:p{partition}}}:usage:{window_start_ms}"

    def usage_open(self, partition: int) -> str:
        """Return the zset of a partition's report windows with unreported usage."""
        return f"{{{self.prefix}:p{partition}}}:usage:open"

    def closing(self, partition: int) -> str:
        """Return the zset of a partition's assets by the end of their current period."""
        return f"{{{self.prefix}:p{partition}}}:closing"

    def customer(self, customer: str) -> str:
        """Return the hash holding a customer's entitlement, version and event sequence."""
        return f"{self.tag(customer)}:c:{key_part(customer)}"

    def ledger(self, customer: str) -> str:
        """Return the list of a customer's balance mutations, newest first."""
        return f"{self.tag(customer)}:ledger:{key_part(customer)}"

    def operation(self, customer: str, op_id: str) -> str:
        """Return the record of one operation id, scoped to the customer."""
        return f"{self.tag(customer)}:op:{key_part(customer)}:{op_id}"

    def asset(self, customer: str, metric: str) -> tuple[str, str]:
        """Return an asset's state hash and the zset of its pending holds and leases."""
        stem = f"{self.tag(customer)}:a:{key_part(customer)}:{key_part(metric)}"
        return stem, stem + ":x"

    def balance(self, customer: str, name: str) -> tuple[str, str]:
        """Return a balance's hash and the zset of its holds' expiries."""
        stem = f"{self.tag(customer)}:b:{key_part(customer)}:{key_part(name)}"
        return stem, stem + ":x"

    def customer_keys(self, customer: str) -> str:
        """Return the hash of a customer's API key ids -> key hashes."""
        return f"{self.tag(customer)}:keys:{key_part(customer)}"

    @property
    def api_keys(self) -> str:
        """Return the hash mapping API key hashes to customers (outside any customer's slot)."""
        return f"{self.prefix}:api-keys"

    @property
    def revocations(self) -> str:
        """Return the counter of API-key revocations (in the API keys' slot)."""
        return f"{{{self.prefix}:api-keys}}:revocations"

    @property
    def revoked_keys(self) -> str:
        """Return the set of revoked key hashes (a configured key revoked stays revoked)."""
        return f"{{{self.prefix}:api-keys}}:revoked"

    @property
    def customers(self) -> str:
        """Return the set of every customer id."""
        return f"{self.prefix}:customers"
