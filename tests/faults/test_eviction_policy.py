"""Fault 7: an evicting maxmemory-policy is refused, or used with a loud warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import RedisProcess
from metergate import AsyncMeter, ConfigError, Meter, StorageUnavailable, parse_config
from metergate.storage import UnsafeStorage

from .conftest import config, run

pytestmark = pytest.mark.redis


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_an_evicting_policy_is_refused_by_default(tmp_path: Path, policy: str) -> None:
    """A Meter and an AsyncMeter refuse a Redis that may evict keys, writing nothing, until its
    policy is set to noeviction."""
    server = RedisProcess(tmp_path / "redis", "--maxmemory-policy", policy)
    server.start()
    client = server.client()
    try:
        with Meter(config(server.url)) as meter:
            with pytest.raises(
                UnsafeStorage, match=f"maxmemory-policy is not 'noeviction'.*{policy}"
            ):
                meter.admit("c", {"calls": 1})
            assert isinstance(UnsafeStorage("x"), StorageUnavailable)

            async def refused() -> None:
                async with AsyncMeter(config(server.url)) as async_meter:
                    with pytest.raises(UnsafeStorage):
                        await async_meter.admit("c", {"calls": 1})

            run(refused())
            assert client.dbsize() == 0
            client.config_set("maxmemory-policy", "noeviction")
            assert meter.admit("c", {"calls": 1}).allowed
    finally:
        client.close()
        server.stop()


def test_an_evicting_policy_is_used_with_a_loud_warning_when_configured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With `storage.eviction: warn`, the Meter works on an evicting Redis and logs one error naming
    the policy."""
    server = RedisProcess(tmp_path / "redis", "--maxmemory-policy", "allkeys-lru")
    server.start()
    try:
        with (
            caplog.at_level(logging.WARNING, logger="metergate"),
            Meter(config(server.url, eviction="warn")) as meter,
        ):
            assert meter.admit("c", {"calls": 1}).allowed
            assert meter.admit("c", {"calls": 1}).allowed
        warnings = [r for r in caplog.records if "allkeys-lru" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.ERROR
    finally:
        server.stop()


def test_a_redis_without_config_is_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With CONFIG disabled (as on managed Redis), the Meter warns that it cannot read the policy
    and works."""
    server = RedisProcess(tmp_path / "redis", "--rename-command", "CONFIG", '""')
    server.start()
    try:
        with (
            caplog.at_level(logging.WARNING, logger="metergate"),
            Meter(config(server.url)) as meter,
        ):
            assert meter.admit("c", {"calls": 1}).allowed
        assert any("cannot read Redis maxmemory-policy" in r.getMessage() for r in caplog.records)
    finally:
        server.stop()


def test_the_eviction_setting_is_validated() -> None:
    """`storage.eviction` accepts refuse (the default) or warn and names the field otherwise."""
    assert parse_config({"storage": {"eviction": "warn"}}).storage.eviction == "warn"
    assert parse_config({}).storage.eviction == "refuse"
    with pytest.raises(ConfigError, match=r"storage\.eviction"):
        parse_config({"storage": {"eviction": "ignore"}})
