"""Idempotency-Key over HTTP, sans-I/O: fingerprints, the stored record, and what a retry gets.

A request carrying `Idempotency-Key` claims a record scoped to its customer (`r:<key>`, apart from
the `k:` operation ids of the admin API and the Python API) with `SET NX`: the claim decides
concurrent duplicates atomically. While the first request is in flight the record says so; when
it completes, the record holds its response (status, headers, body) for replay. A request that
was refused, refunded, or whose response was too large to store gives its claim up, so that a
retry is forwarded and metered as new.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from metergate.core.flows import Command, Flow
from metergate.core.keys import Keys

__all__ = [
    "Claim",
    "Stored",
    "claim",
    "complete",
    "degraded_operation",
    "fingerprint",
    "release",
]

_SEP = "\x1f"
# what a replay never repeats: framing and the connection's own fields
_NOT_REPLAYED = frozenset({"content-length", "transfer-encoding", "connection", "date"})


def fingerprint(
    method: str,
    path: str,
    query: str,
    amounts: Mapping[str, int],
    body_sha256: str,
) -> str:
    """Return the fingerprint of a request: method, path and query, metered amounts, body."""
    parts = [method.upper(), path, query, json.dumps(sorted(amounts.items())), body_sha256]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def degraded_operation(key: str, fp: str) -> str:
    """Return the operation id recording a keyed request let through while storage was down: a
    retry of the same request (same fingerprint) is recorded once, and another request under the
    same key is recorded as its own, never bought by the first."""
    return f"degraded:{key}:{fp}"


@dataclass(frozen=True, slots=True)
class Stored:
    """A completed request's response, to replay."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    """What a request with an Idempotency-Key may do: `proceed`, `replay`, or a 409 slug."""

    outcome: str  # proceed | replay | idempotency-conflict | idempotency-in-flight
    stored: Stored | None = None


def _key(keys: Keys, customer: str, key: str) -> str:
    return keys.operation(customer, "r:" + key)


def claim(keys: Keys, customer: str, key: str, fp: str, in_flight_ms: int) -> Flow[Claim]:
    """Claim the key for this request, or say why not (replay, conflict, in flight)."""
    record_key = _key(keys, customer, key)
    for _attempt in range(3):
        won = yield Command(
            ("SET", record_key, f"inflight{_SEP}{fp}", "NX", "PX", str(in_flight_ms))
        )
        if won:
            return Claim("proceed")
        record = yield Command(("GET", record_key))
        if record is None:
            continue  # given up meanwhile: claim again
        state, stored_fp, *rest = record.split(_SEP)
        if stored_fp != fp:
            return Claim("idempotency-conflict")
        if state == "inflight":
            return Claim("idempotency-in-flight")
        status, headers, body = rest
        return Claim(
            "replay",
            Stored(
                int(status),
                [(str(k), str(v)) for k, v in json.loads(headers)],
                base64.b64decode(body),
            ),
        )
    return Claim("idempotency-in-flight")


def complete(
    keys: Keys,
    customer: str,
    key: str,
    fp: str,
    status: int,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    ttl_ms: int,
) -> Flow[None]:
    """Store a completed request's response under its key, for replay."""
    kept = [[k, v] for k, v in headers if k.lower() not in _NOT_REPLAYED]
    record = _SEP.join(("done", fp, str(status), json.dumps(kept), base64.b64encode(body).decode()))
    yield Command(("SET", _key(keys, customer, key), record, "PX", str(ttl_ms)))


def release(keys: Keys, customer: str, key: str) -> Flow[None]:
    """Give a claim up: the next request with this key is forwarded and metered as new."""
    yield Command(("DEL", _key(keys, customer, key)))
