"""The allowance book alone: who gets an allowance, how big, and the fields it answers with."""

from __future__ import annotations

from metergate.config import AllowancesConfig
from metergate.core.allowances import Book, decision_for
from metergate.core.http import ratelimit_fields
from metergate.core.model import AssetUsage, Decision, Ticket

KEY = ("acme", (("calls", 1),))


def _grant(requests: int, *, remaining: int = 500, available: int = 1000) -> Decision:
    """A grant's decision: usage and balance with the whole allowance already taken."""
    usage = AssetUsage(
        "calls", 10, requests, "Normal", "NotifyOnly", 1000, remaining, 0, False, 0, 2_592_000
    )
    hold = Ticket(
        "acme",
        "pro",
        "a:1",
        {"calls": requests},
        {},
        requests=requests,
        held={"credits": 2 * requests},
    )
    return Decision(
        True,
        200,
        None,
        "acme",
        "Normal",
        assets={"calls": usage},
        balances={"credits": available},
        ticket=hold,
    )


def test_a_key_asking_less_than_once_a_flush_stays_per_request() -> None:
    """A grant and a settlement are two storage calls: a quiet key is cheaper per request."""
    book = Book(AllowancesConfig(enabled=True, flush_ms=250))
    assert not book.busy(KEY, 100.0)  # first sight
    assert not book.busy(KEY, 101.0)  # a second later: quiet
    assert not book.busy(KEY, 101.2)  # within a flush, but less than twice a flush
    assert book.busy(KEY, 101.3)  # within half a flush: busy


def test_the_size_follows_the_rate_and_max_units() -> None:
    """1.5 flushes of the observed rate, plus one; never more than `max_units` units."""
    book = Book(AllowancesConfig(enabled=True, flush_ms=250, max_units=1000))
    book.busy(KEY, 100.0)
    assert book.busy(KEY, 100.01)  # 100 requests a second
    assert book.wanted(KEY, {"calls": 1}) == 39  # ceil(100 * 0.25 * 1.5) + 1
    assert book.wanted(KEY, {"calls": 100}) == 10  # 1,000 units at most


def test_an_allowance_gives_what_it_holds_then_closes() -> None:
    """Exactly `granted` requests are given; the last closes it, and it is settled once every
    request has ended, with the refunded ones left out."""
    book = Book(AllowancesConfig(enabled=True, flush_ms=250))
    book.opened(KEY, _grant(3), {"calls": 1}, 100.0)
    given = [book.take_local(KEY, 100.01) for _ in range(4)]
    assert [g[1] if g else None for g in given] == [2, 1, 0, None]
    assert book.due(100.02) == []  # closed, but its requests are still running
    first, second, third = (g[0] for g in given[:3] if g)
    book.release(first, refunded=False)
    book.release(second, refunded=True)
    assert book.due(100.03) == []
    book.release(third, refunded=False)
    (settled,) = book.due(100.04)
    assert settled.used() == {"calls": 2}
    assert book.due(100.05) == [] and len(book) == 0


def test_an_allowance_stops_giving_at_its_flush() -> None:
    """After `flush_ms` an open allowance gives nothing more and is settled."""
    book = Book(AllowancesConfig(enabled=True, flush_ms=250))
    book.opened(KEY, _grant(100), {"calls": 1}, 100.0)
    assert book.take_local(KEY, 100.1) is not None
    assert book.take_local(KEY, 100.3) is None
    (settled,) = book.due(100.3) or book.due(100.3, everything=True)
    assert settled.taken == 1


def test_the_fast_fields_are_the_decisions_fields() -> None:
    """The fields encoded once per allowance equal those a Decision of the same request gives."""
    book = Book(AllowancesConfig(enabled=True, flush_ms=250))
    book.opened(KEY, _grant(5, remaining=400, available=990), {"calls": 1}, 100.0)
    for _ in range(5):
        got = book.take_local(KEY, 100.0)
        assert got is not None
        allowance, left = got
        slow = ratelimit_fields(decision_for(allowance, left), 1_000_000.0)
        assert allowance.fields(left, 1_000_000.0) == slow
        assert allowance.raw_fields(left, 1_000_000.0) == [
            (k.encode(), v.encode()) for k, v in slow
        ]
        assert dict(slow)["ratelimit"] == f'"calls";r={400 + left};t=1592000'
        assert dict(slow)["metergate-balance"] == str(990 + 2 * left)
