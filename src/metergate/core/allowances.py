"""Local allowances: most requests admitted in process, from units taken from storage in advance.

An allowance is one hold in storage (the grant in admit.lua): a number of requests of the same
amounts, inside every asset's current tier and above every balance's floor, counted as pending on
the quota and priced on the balance. Requests take from it with integer arithmetic. It stops
giving after `flush_ms` (or when empty) and is then settled, once, for what its requests used: the
units of the requests that ended without a refund, plus those still running at its deadline. What
it did not give returns with that settlement, or, if the process dies, when the hold expires.

The book is sans-I/O: it says what to grant and what to settle; the meters run the storage calls.
It is shared by an event loop and by the threads of a WSGI server, so it takes a lock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from metergate.config import AllowancesConfig
from metergate.core.http import sf_string
from metergate.core.model import AssetUsage, Decision, Ticket

__all__ = ["Allowance", "Book", "Key", "decision_for"]

Key = tuple[str, tuple[tuple[str, int], ...]]
"""(customer, the request's (metric, units) pairs): requests of one key share allowances."""

SEEN_KEYS = 100_000
"""Keys whose last per-request admission is remembered (to tell busy keys); cleared beyond."""


@dataclass(eq=False, slots=True)
class Allowance:
    """One grant held in storage, and what this process has given from it."""

    key: Key
    hold: Ticket
    """The storage hold: what settles the allowance."""
    per: Mapping[str, int]
    """Units of each metric per request."""
    granted: int
    opened: float
    closes: float
    """No request is given after this (monotonic seconds): the flush."""
    deadline: float
    """Settled by this time whatever is still running, well before the hold expires."""
    base: Decision
    """The grant's decision: usage and balances with the whole allowance held."""
    held: Mapping[str, int] = field(default_factory=dict)
    """Credits held per balance for the whole allowance."""
    taken: int = 0
    refunded: int = 0
    running: int = 0
    closed: bool = False
    settled: bool = False
    encoded: Encoded | None = None
    """The response fields' parts that stay the same for every request it gives."""

    def used(self) -> dict[str, int]:
        """The units to settle: every request given, less the refunded ones."""
        n = self.taken - self.refunded
        return {metric: n * units for metric, units in self.per.items()}

    def fields(self, left: int, now_s: float) -> list[tuple[str, str]]:
        """The RateLimit and Metergate fields of a request it gave, `left` requests still free:
        what a per-request admission would answer (see `core.http.ratelimit_fields`)."""
        encoded = self.encoded
        if encoded is None:
            encoded = self.encoded = _encode(self)
        out: list[tuple[str, str]] = []
        if encoded.policy:
            items = []
            for name, base, per, end in encoded.limits:
                remaining = base + left * per
                if end is None:
                    items.append(f"{name};r={remaining}")
                else:
                    items.append(f"{name};r={remaining};t={max(0, math.ceil(end - now_s))}")
            out.append(("ratelimit-policy", encoded.policy))
            out.append(("ratelimit", ", ".join(items)))
        if encoded.level:
            out.append(("metergate-level", encoded.level))
        if encoded.balances:
            granted = self.granted
            shown = [(name, base + held * left // granted) for name, base, held in encoded.balances]
            if len(shown) == 1:
                out.append(("metergate-balance", str(shown[0][1])))
            else:
                text = ", ".join(f"{name}={value}" for name, value in shown)
                out.append(("metergate-balance", text))
        return out

    def raw_fields(self, left: int, now_s: float) -> list[tuple[bytes, bytes]]:
        """`fields`, encoded for ASGI from parts encoded once."""
        encoded = self.encoded
        if encoded is None:
            encoded = self.encoded = _encode(self)
        out: list[tuple[bytes, bytes]] = []
        if encoded.policy:
            items = []
            for name, base, per, end in encoded.raw_limits:
                if end is None:
                    items.append(b"%s;r=%d" % (name, base + left * per))
                else:
                    reset = max(0, math.ceil(end - now_s))
                    items.append(b"%s;r=%d;t=%d" % (name, base + left * per, reset))
            out.append((b"ratelimit-policy", encoded.raw_policy))
            out.append((b"ratelimit", b", ".join(items)))
        if encoded.level:
            out.append((b"metergate-level", encoded.raw_level))
        if len(encoded.balances) == 1:
            _name, base, held = encoded.balances[0]
            out.append((b"metergate-balance", b"%d" % (base + held * left // self.granted)))
        elif encoded.balances:
            out.append(
                (b"metergate-balance", dict(self.fields(left, now_s))["metergate-balance"].encode())
            )
        return out


@dataclass(frozen=True, slots=True)
class Encoded:
    """The parts of an allowance's response fields that do not change from request to request."""

    policy: str
    limits: tuple[tuple[str, int, int, float | None], ...]
    """Per limited asset: its quoted name, remaining with the whole allowance taken, units per
    request, period end (epoch seconds; None without a period)."""
    level: str
    balances: tuple[tuple[str, int, int], ...]
    """Per balance: name, available with the whole allowance held, credits the allowance holds."""
    raw_policy: bytes = b""
    raw_limits: tuple[tuple[bytes, int, int, float | None], ...] = ()
    raw_level: bytes = b""


def _encode(allowance: Allowance) -> Encoded:
    base = allowance.base
    policies: list[str] = []
    limits: list[tuple[str, int, int, float | None]] = []
    for metric, usage in base.assets.items():
        if usage.limit is None:
            continue
        name = sf_string(metric)
        start, end = usage.period_start, usage.period_end
        window = end - start if start is not None and end is not None else None
        policies.append(f"{name};q={usage.limit}" + ("" if window is None else f";w={window}"))
        limits.append(
            (name, usage.remaining or 0, allowance.per[metric], end if window is not None else None)
        )
    return Encoded(
        policy=", ".join(policies),
        limits=tuple(limits),
        raw_policy=", ".join(policies).encode("latin-1"),
        raw_limits=tuple((n.encode("latin-1"), b, p, e) for n, b, p, e in limits),
        raw_level=(base.level or "").encode("latin-1"),
        level=base.level or "",
        balances=tuple(
            (name, available, allowance.held.get(name, 0))
            for name, available in base.balances.items()
        ),
    )


class Book:
    """This process's allowances, by key."""

    def __init__(self, config: AllowancesConfig) -> None:
        self.flush_s = config.flush_ms / 1000
        self.ttl_s = config.ttl / 1000
        self.max_units = config.max_units
        self._open: dict[Key, Allowance] = {}
        self._closed: list[Allowance] = []
        self._cold: dict[Key, float] = {}
        self._rate: dict[Key, float] = {}
        self._seen: dict[Key, float] = {}
        self._lock = threading.Lock()

    # -- the request path ----------------------------------------------------------------------

    def take(self, key: Key, now: float) -> Decision | None:
        """Admit one request from the key's allowance; None when it has none to give."""
        got = self.take_local(key, now)
        return None if got is None else decision_for(*got)

    def take_local(self, key: Key, now: float) -> tuple[Allowance, int] | None:
        """Admit one request from the key's allowance: the allowance and the requests it has
        still free (for its fields); None when it has none to give. `release` ends it."""
        with self._lock:
            allowance = self._open.get(key)
            if allowance is None:
                return None
            if allowance.taken >= allowance.granted or now >= allowance.closes:
                self._close(allowance, now)
                return None
            allowance.taken += 1
            allowance.running += 1
            left = allowance.granted - allowance.taken
            if left == 0:
                self._close(allowance, now)
        return allowance, left

    def take_peek(self, key: Key, now: float) -> bool:
        """Whether the key has an allowance with a request to give."""
        allowance = self._open.get(key)
        return (
            allowance is not None and allowance.taken < allowance.granted and now < allowance.closes
        )

    def cold(self, key: Key, now: float) -> bool:
        """Whether the key's requests go per request for now (its last grant gave nothing)."""
        until = self._cold.get(key)
        if until is None:
            return False
        if now < until:
            return True
        self._cold.pop(key, None)  # threads may race here
        return False

    def busy(self, key: Key, now: float) -> bool:
        """Whether the key is busy enough for an allowance: its previous request came within
        half a flush. A grant and a settlement cost two storage calls: a key asking less than
        twice a flush is as cheap or cheaper per request."""
        previous = self._seen.get(key)
        if len(self._seen) >= SEEN_KEYS:
            self._seen.clear()
        self._seen[key] = now
        if previous is None or now - previous > self.flush_s / 2:
            return False
        if key not in self._rate:
            self._rate[key] = 1 / max(now - previous, 1e-4)
        return True

    def wanted(self, key: Key, per: Mapping[str, int]) -> int:
        """How many requests to ask for: what the key's rate uses in 1.5 flushes, capped by
        `max_units`; storage then shortens it to the distance to the next boundary."""
        cap = max(1, self.max_units // max(max(per.values()), 1))
        rate = self._rate.get(key, 1 / self.flush_s)
        return max(1, min(cap, math.ceil(rate * self.flush_s * 1.5) + 1))

    def opened(self, key: Key, decision: Decision, per: Mapping[str, int], now: float) -> None:
        """Keep a grant's allowance; a refused grant sends the key per request for a flush."""
        hold = decision.ticket
        with self._lock:
            if not decision.allowed or hold is None or hold.requests < 1:
                if decision.problem != "period":  # a period's first request: try again after
                    # `ineligible` (strict assets, throttles) does not change within a plan
                    pause = self.ttl_s * 5 if decision.problem == "ineligible" else self.flush_s
                    self._cold[key] = now + pause
                return
            old = self._open.get(key)
            if old is not None:
                self._close(old, now)
            self._open[key] = Allowance(
                key=key,
                hold=hold,
                per=dict(per),
                granted=hold.requests,
                opened=now,
                closes=now + self.flush_s,
                # the hold lives `ttl` from the grant; settle with half of it to spare
                deadline=now + max(self.flush_s, self.ttl_s / 2),
                base=decision,
                held=dict(hold.held),
            )

    def finish(self, ticket: Ticket, refunded: bool) -> None:
        """A request given from an allowance ended; `refunded` when it is not to be charged."""
        allowance = ticket.allowance
        if isinstance(allowance, Allowance):
            self.release(allowance, refunded)

    def release(self, allowance: Allowance, refunded: bool) -> None:
        """A request given from `allowance` ended; `refunded` when it is not to be charged."""
        with self._lock:
            if allowance.settled:
                return  # settled at its deadline with this request counted as used
            allowance.running -= 1
            if refunded:
                allowance.refunded += 1

    # -- the background path -------------------------------------------------------------------

    def ready(self, customer: str) -> list[Allowance]:
        """Return the customer's closed allowances that are ready to settle (none running)."""
        with self._lock:
            ready = [a for a in self._closed if a.key[0] == customer and a.running <= 0]
            for allowance in ready:
                allowance.settled = True
            self._closed = [a for a in self._closed if not a.settled]
        return ready

    def due(
        self, now: float, customer: str | None = None, everything: bool = False
    ) -> list[Allowance]:
        """Close the allowances whose time is up and return those ready to settle: closed, with
        no request running (or past their deadline). `customer` closes that customer's at once
        (a read or change of its state must see every unit); `everything` closes all."""
        with self._lock:
            for allowance in list(self._open.values()):
                if (
                    everything
                    or now >= allowance.closes
                    or (customer is not None and allowance.key[0] == customer)
                ):
                    self._close(allowance, now)
            ready = [
                a
                for a in self._closed
                if not a.settled and (a.running <= 0 or now >= a.deadline or everything)
            ]
            for allowance in ready:
                allowance.settled = True
            self._closed = [a for a in self._closed if not a.settled]
        return ready

    def retry(self, allowance: Allowance) -> None:
        """Keep an allowance whose settlement failed, to settle it again."""
        with self._lock:
            allowance.settled = False
            self._closed.append(allowance)

    def holds(self, customer: str) -> bool:
        """Whether this process holds an allowance of `customer`, open or unsettled."""
        with self._lock:
            return any(a.key[0] == customer for a in self._open.values()) or any(
                a.key[0] == customer for a in self._closed
            )

    def __len__(self) -> int:
        return len(self._open) + len(self._closed)

    def _close(self, allowance: Allowance, now: float) -> None:
        if allowance.closed:
            return
        allowance.closed = True
        if self._open.get(allowance.key) is allowance:
            del self._open[allowance.key]
        self._closed.append(allowance)
        elapsed = max(now - allowance.opened, 0.001)
        # an allowance emptied early says the rate is at least that; one that lasted says it
        rate = allowance.taken / elapsed
        if rate * self.flush_s >= 2:
            self._rate[allowance.key] = rate
            self._seen[allowance.key] = now  # still busy: its next request takes a new one
        else:
            self._rate.pop(allowance.key, None)  # gone quiet: per request until busy again


def decision_for(allowance: Allowance, left: int) -> Decision:
    """The decision of a request given from an allowance, with the fields storage would give
    had it been admitted alone: the allowance's unused requests are still free."""
    base = allowance.base
    assets: dict[str, AssetUsage] = {}
    for metric, usage in base.assets.items():
        remaining = usage.remaining
        if remaining is not None:
            remaining += left * allowance.per[metric]
        assets[metric] = AssetUsage(
            usage.metric,
            usage.value,
            usage.pending,
            usage.level,
            usage.policy,
            usage.limit,
            remaining,
            usage.overage,
            usage.suspended,
            usage.period_start,
            usage.period_end,
        )
    balances = {
        name: available + allowance.held.get(name, 0) * left // allowance.granted
        for name, available in base.balances.items()
    }
    hold = allowance.hold
    ticket = Ticket(hold.customer, hold.plan, hold.hold_id, {}, {}, allowance=allowance)
    return Decision(
        True, 200, None, hold.customer, base.level, assets=assets, balances=balances, ticket=ticket
    )
