"""The `stripe` section: meter events for counters only, report windows in whole seconds."""

import pytest

from metergate import ConfigError, parse_config
from metergate.worker.entry import stripe_destinations

METRICS = {"calls": {"type": "CumulativeCounter"}, "seats": {"type": "Gauge"}}


def test_stripe_section_builds_the_meter_events_destination() -> None:
    """A valid stripe section yields one Stripe destination for the worker."""
    config = parse_config(
        {
            "metrics": METRICS,
            "stripe": {
                "api_key": "sk_test_x",
                "meters": {"calls": "api_calls"},
                "customers": {"acme": "cus_123"},
            },
        }
    )
    assert config.stripe is not None and config.stripe.value == "quantity"
    assert len(stripe_destinations(config)) == 1


def test_stripe_meters_must_name_counters() -> None:
    """A Gauge or an unknown metric under stripe.meters is an error naming its path."""
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"metrics": METRICS, "stripe": {"api_key": "k", "meters": {"seats": "s", "x": "y"}}}
        )
    assert info.value.errors == [
        ("stripe.meters.seats", "usage is reported for counters only, not Gauge"),
        ("stripe.meters.x", "metric 'x' is not defined in metrics"),
    ]


def test_report_interval_must_be_whole_seconds() -> None:
    """usage_report_interval of 1500ms is refused: report ids are in epoch seconds."""
    with pytest.raises(ConfigError) as info:
        parse_config({"usage_report_interval": "1500ms"})
    assert info.value.errors == [("usage_report_interval", "must be a whole number of seconds")]
