"""The ledger's trim on every backend: what it drops is carried, so the ledger still adds up."""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.storage.credits import config

from metergate import Meter

MakeMeter = Callable[..., Meter]


def test_trimmed_ledger_still_sums_to_the_amount(make_meter: MakeMeter) -> None:
    """After more than 10,100 lines, the stored ledger is trimmed, yet the sum of its deltas (a
    `carried` line standing for what was dropped, the `initial` line included) is the amount."""
    meter = make_meter(config())
    for i in range(10_150):
        meter.topup("c", "credits", 1 + i % 3)
    client = meter.storage.client
    rows = client.lrange(meter.core.keys.ledger("c"), 0, -1)
    assert len(rows) <= 10_100
    entries = [json.loads(row) for row in rows]
    assert "initial" not in [e["kind"] for e in entries]
    assert entries[-1]["kind"] == "carried"
    assert sum(e["delta"] for e in entries) == meter.balance("c", "credits").amount
