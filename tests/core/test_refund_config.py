"""Config of refunds and Idempotency-Key replay: defaults, accepted forms, errors naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from metergate import ConfigError
from metergate.config import parse_config
from metergate.core.http import refund_statuses


def route(**extra: Any) -> dict[str, Any]:
    """A config with one route carrying `extra`."""
    return {"routes": [{"path": "/x", **extra}]}


def test_refund_on_defaults_to_server_errors() -> None:
    """Without `refund_on` a route refunds every 5xx and nothing else."""
    statuses = refund_statuses(parse_config(route()).routes[0].refund_on)
    assert statuses == frozenset(range(500, 600))


def test_refund_on_takes_statuses_and_classes_or_nothing() -> None:
    """Integers name one status, `"4xx"` a class, `[]` refunds nothing."""
    cfg = parse_config(route(refund_on=[502, "4xx"]))
    assert refund_statuses(cfg.routes[0].refund_on) == frozenset({502, *range(400, 500)})
    assert refund_statuses(parse_config(route(refund_on=[])).routes[0].refund_on) == frozenset()


@pytest.mark.parametrize("bad", [600, 99, "6xx", "5XX", "502", True, 5.0])
def test_a_bad_refund_on_item_names_its_path(bad: object) -> None:
    """A status out of range, an unknown class or another type is an error naming the item."""
    with pytest.raises(ConfigError) as info:
        parse_config(route(refund_on=[bad]))
    assert "routes[0].refund_on[0]" in str(info.value)


def test_idempotency_settings_have_defaults_and_are_checked() -> None:
    """Replay keeps responses up to 1 MiB for 24 h by default; a negative size names its field."""
    cfg = parse_config({})
    assert (cfg.idempotency.ttl, cfg.idempotency.max_response_bytes) == (86_400_000, 1_048_576)
    assert parse_config({"idempotency": {"ttl": "1h"}}).idempotency.ttl == 3_600_000
    with pytest.raises(ConfigError) as info:
        parse_config({"idempotency": {"max_response_bytes": -1}})
    assert "idempotency.max_response_bytes" in str(info.value)
