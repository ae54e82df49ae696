"""With allowances on, which requests come from the allowance and which are decided per request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metergate import Meter

from .conftest import Gateway

ACME = {"authorization": "Bearer acme-key"}


def _raw(gateway: Gateway) -> Meter:
    """A Meter reading storage as it is, without settling the middleware's allowances first."""
    return Meter(gateway.config)


def test_plain_requests_come_from_an_allowance_and_keyed_ones_never(
    start_gateway: Callable[..., Gateway], gateway_config: dict[str, Any]
) -> None:
    """Fixed-cost requests without a key are given in process (storage shows them pending);
    a request with an Idempotency-Key is decided in storage at once (SPEC section 2)."""
    gateway = start_gateway({**gateway_config, "allowances": {"enabled": True}})
    for _ in range(4):
        assert gateway.client.get("/v1/anything", headers=ACME).status_code == 200
    with _raw(gateway) as raw:
        before = raw.usage("acme", "calls")
        assert before["pending"] > 0  # an allowance is open
        keyed = gateway.client.get("/v1/anything", headers={**ACME, "idempotency-key": "k-1"})
        assert keyed.status_code == 200
        after = raw.usage("acme", "calls")
    assert after["value"] == before["value"] + 1  # counted in storage, not from the allowance
    assert gateway.meter.usage("acme", "calls")["value"] == 5  # settled: every request counted
