"""API keys: the stored hash is never a key; a revoked key stops working everywhere, fast."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.adapters.harness import serve_asgi
from tests.security.conftest import KEY, OTHER_KEY, Gateway, config, serve, upstream

from metergate import create_app
from metergate.admin import admin_app
from metergate.config import hash_api_key
from metergate.core.http import KeyCache
from metergate.core.revocations import CHECK_S, Revocations

# What another process may take to see a revocation: the cache's check interval, twice.
PROPAGATION_S = 2 * CHECK_S


@pytest.fixture
def gateway(tmp_path: Path, storage_url: str) -> Iterator[Gateway]:
    """`metergate serve` on the test's backend in front of a recording upstream."""
    with upstream() as (url, _), serve(config(url, storage_url), tmp_path) as gw:
        yield gw


def test_the_stored_hash_of_a_key_does_not_authenticate(gateway: Gateway) -> None:
    """`Bearer sha256:<hex of the key>` (what a config, dump or backup holds) is 401."""
    assert gateway.get("/v1/hello").status_code == 200
    stolen = hash_api_key(KEY)
    r = gateway.get("/v1/hello", key=stolen)
    assert r.status_code == 401
    assert r.json()["type"] == "urn:metergate:problem:unauthenticated"


def test_a_key_id_shown_by_the_admin_api_does_not_authenticate(gateway: Gateway) -> None:
    """The key ids the admin API lists are not secrets and never authenticate."""
    ids = gateway.admin_call("GET", "/v1/customers/acme").json()["api_keys"]
    assert ids
    for key_id in ids:
        assert gateway.get("/v1/hello", key=key_id).status_code == 401


def test_a_revoked_key_is_refused_at_once_by_the_process_that_revoked_it(gateway: Gateway) -> None:
    """Right after DELETE .../api-keys/{id} answers, the same serve process refuses the key."""
    issued = gateway.admin_call("POST", "/v1/customers/acme/api-keys").json()
    for _ in range(3):  # remembered by the key cache
        assert gateway.get("/v1/hello", key=issued["key"]).status_code == 200
    r = gateway.admin_call("DELETE", f"/v1/customers/acme/api-keys/{issued['id']}")
    assert r.status_code == 204
    assert gateway.get("/v1/hello", key=issued["key"]).status_code == 401


def test_a_revoked_configured_key_is_refused_at_once(gateway: Gateway) -> None:
    """A key from the config file, revoked through the admin API, is refused at once."""
    assert gateway.get("/v1/hello").status_code == 200
    key_id = hash_api_key(KEY).removeprefix("sha256:")[:16]
    assert gateway.admin_call("DELETE", f"/v1/customers/acme/api-keys/{key_id}").status_code == 204
    assert gateway.get("/v1/hello").status_code == 401


def test_another_process_refuses_a_revoked_key_within_a_second(
    tmp_path: Path, shared_storage: str
) -> None:
    """Two serve processes on one storage: a key revoked through one is refused by the other."""
    with (
        upstream() as (url, _),
        serve(config(url, shared_storage), tmp_path) as first,
        serve(config(url, shared_storage), tmp_path) as second,
    ):
        issued = first.admin_call("POST", "/v1/customers/acme/api-keys").json()
        assert second.get("/v1/hello", key=issued["key"]).status_code == 200  # now cached there
        revoked = first.admin_call("DELETE", f"/v1/customers/acme/api-keys/{issued['id']}")
        assert revoked.status_code == 204
        time.sleep(PROPAGATION_S)
        assert second.get("/v1/hello", key=issued["key"]).status_code == 401
        assert first.get("/v1/hello", key=issued["key"]).status_code == 401


def test_another_gateway_on_the_same_store_refuses_a_revoked_key(storage_url: str) -> None:
    """Two gateways with their own meters and key caches over one store (any backend, the
    embedded one included): a revocation through one reaches the other's cache."""
    with upstream() as (url, _):
        cfg = config(url, storage_url)
        with (
            serve_asgi(create_app(cfg)) as first,
            serve_asgi(create_app(cfg)) as second,
            serve_asgi(admin_app(cfg)) as admin,
        ):
            token = {"Authorization": f"Bearer {cfg['admin']['token']}"}
            issued = httpx.post(f"{admin}/v1/customers/acme/api-keys", headers=token).json()
            bearer = {"Authorization": f"Bearer {issued['key']}"}
            assert httpx.get(f"{first}/v1/hello", headers=bearer).status_code == 200
            assert httpx.get(f"{second}/v1/hello", headers=bearer).status_code == 200
            path = f"{admin}/v1/customers/acme/api-keys/{issued['id']}"
            assert httpx.delete(path, headers=token).status_code == 204
            time.sleep(PROPAGATION_S)
            assert httpx.get(f"{first}/v1/hello", headers=bearer).status_code == 401
            assert httpx.get(f"{second}/v1/hello", headers=bearer).status_code == 401


def test_a_revoked_configured_key_stays_revoked_after_a_restart(
    tmp_path: Path, shared_storage: str
) -> None:
    """A key from the config file, revoked at runtime, is not brought back by the next start."""
    key_id = hash_api_key(KEY).removeprefix("sha256:")[:16]
    with upstream() as (url, _):
        cfg = config(url, shared_storage)
        with serve(cfg, tmp_path) as gw:
            path = f"/v1/customers/acme/api-keys/{key_id}"
            assert gw.admin_call("DELETE", path).status_code == 204
        with serve(cfg, tmp_path) as gw:
            assert gw.get("/v1/hello").status_code == 401
            assert gw.get("/v1/hello", key=OTHER_KEY).status_code == 200


def test_the_key_cache_trusts_an_entry_only_under_the_count_it_was_read_with() -> None:
    """A higher revocation count makes every cached key stale at once; an older count read by a
    racing lookup is refused, so its answer is read again."""
    revocations = Revocations()
    cache = KeyCache(revocations)
    cache.put("k", "acme", now=100.0)
    assert cache.get("k", now=100.1) == "acme"
    assert revocations.observe(b"1")
    assert cache.get("k", now=100.1) is None
    assert not revocations.observe("0")
    cache.put("k", "acme", now=100.2)
    assert cache.get("k", now=100.2 + CHECK_S) is None  # not checked again since: not trusted
