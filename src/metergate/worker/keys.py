"""Key names of the worker's Redis structures, next to each partition's outbox (one slot each).

Per partition `p`, under the partition's hash tag `{prefix:p<p>}`:

- `:outbox`: the events (stream; the admission scripts append, the worker's group reads);
- `:dead`: dead letters, one per (event, destination) given up on (stream);
- `:retry`: outbox entries waiting for a retry (zset: stream id -> next attempt ms);
- `:dlv:<stream id>`: one entry's per-destination delivery state (hash, only after a failure);
- `:usage:<window start ms>`: usage aggregated for `usage.reported` (hash, see report.lua);
- `:usage:open`: windows with usage (zset: window start ms -> window end ms);
- `:usage:done`: windows already reported (zset: window start ms -> window start ms);
- `:closing`: assets whose period is open (zset: `customer<US>metric` -> period end ms).

Outside any slot: `prefix:webhooks:disabled` (hash: destination id -> why and when) and
`prefix:workers` (zset: consumer name -> last pass, ms).
"""

from __future__ import annotations

from dataclasses import dataclass

from metergate.core.keys import Keys

__all__ = ["GROUP", "WorkerKeys"]

GROUP = "metergate"
"""The consumer group every worker reads the outboxes with."""


@dataclass(frozen=True, slots=True)
class WorkerKeys:
    """Builds the worker's key names from the gateway's Keys (same prefix and partitions)."""

    keys: Keys

    @property
    def partitions(self) -> int:
        """How many partitions (and outboxes) there are."""
        return self.keys.partitions

    def _tag(self, partition: int) -> str:
        return f"{{{self.keys.prefix}:p{partition}}}"

    def outbox(self, partition: int) -> str:
        """Return the outbox stream of one partition."""
        return self.keys.outbox(partition)

    def dead_letters(self, partition: int) -> str:
        """Return the dead-letter stream of one partition."""
        return f"{self._tag(partition)}:dead"

    def retries(self, partition: int) -> str:
        """Return the zset of outbox entries waiting for a retry, scored by next attempt (ms)."""
        return f"{self._tag(partition)}:retry"

    def delivery(self, partition: int, stream_id: str) -> str:
        """Return the hash of one outbox entry's per-destination delivery state."""
        return f"{self._tag(partition)}:dlv:{stream_id}"

    def usage_window(self, partition: int, window_start_ms: int) -> str:
        """Return the hash aggregating one window's usage for `usage.reported`."""
        return f"{self._tag(partition)}:usage:{window_start_ms}"

    def usage_open(self, partition: int) -> str:
        """Return the zset of windows holding usage (window start ms -> window end ms)."""
        return f"{self._tag(partition)}:usage:open"

    def usage_done(self, partition: int) -> str:
        """Return the zset of windows already reported."""
        return f"{self._tag(partition)}:usage:done"

    def closing(self, partition: int) -> str:
        """Return the zset of assets with an open period (`customer<US>metric` -> period end ms)."""
        return f"{self._tag(partition)}:closing"

    @property
    def disabled(self) -> str:
        """Return the hash of disabled destinations (a 410 from a webhook receiver)."""
        return f"{self.keys.prefix}:webhooks:disabled"

    @property
    def workers(self) -> str:
        """Return the zset of worker consumers and when each last finished a pass (ms)."""
        return f"{self.keys.prefix}:workers"
