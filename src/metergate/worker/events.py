"""Outbox entries as events, and the body a webhook receiver gets for one (pure)."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["OutboxEvent", "matches", "parse_entry", "rfc3339", "webhook_body"]


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One outbox entry: the event the scripts appended, and where it sits in the stream."""

    stream_id: str
    partition: int
    id: str
    type: str
    customer: str
    time_ms: int
    data: dict[str, Any]
    only: frozenset[str] = field(default_factory=frozenset)
    """Destination ids this copy is for (a redelivery to one endpoint); empty means all."""
    error: str | None = None
    """Why the entry cannot be delivered as it is (malformed), or None."""


def parse_entry(stream_id: str, fields: Mapping[str, str], partition: int) -> OutboxEvent:
    """Read a stream entry's fields (`id`, `type`, `customer`, `time`, `data`, optional `only`)."""
    problems = [name for name in ("id", "type", "data") if not fields.get(name)]
    data: Any = {}
    if not problems:
        try:
            data = json.loads(fields["data"])
        except ValueError:
            problems.append("data (not JSON)")
        if not isinstance(data, dict):
            data, problems = {}, [*problems, "data (not an object)"]
    try:
        time_ms = int(fields.get("time", "0"))
    except ValueError:
        time_ms, problems = 0, [*problems, "time"]
    only = frozenset(x for x in fields.get("only", "").split(",") if x)
    return OutboxEvent(
        stream_id=stream_id,
        partition=partition,
        id=fields.get("id", "") or f"stream:{partition}:{stream_id}",
        type=fields.get("type", ""),
        customer=fields.get("customer", ""),
        time_ms=time_ms,
        data=data,
        only=only,
        error=f"malformed outbox entry: {', '.join(problems)}" if problems else None,
    )


def rfc3339(epoch_ms: int) -> str:
    """Format epoch milliseconds as RFC 3339 in UTC with milliseconds (`...T08:00:00.000Z`)."""
    moment = datetime.fromtimestamp(epoch_ms // 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{epoch_ms % 1000:03d}Z"


def webhook_body(event: OutboxEvent) -> bytes:
    """Render the Standard Webhooks body `{"type", "timestamp", "data"}` as compact UTF-8 JSON."""
    body = {"type": event.type, "timestamp": rfc3339(event.time_ms), "data": event.data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def matches(patterns: Iterable[str], event_type: str) -> bool:
    """True if the event type matches one of the shell-style patterns (`quota.*`, `*`)."""
    return any(fnmatch.fnmatchcase(event_type, pattern) for pattern in patterns)
