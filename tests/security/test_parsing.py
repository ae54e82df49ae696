"""Parsing: admin JSON without duplicate keys or deep nesting; config files with YAML limits."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.security.conftest import Gateway, balance, config, serve, upstream

from metergate.config import ConfigError, load_config
from metergate.core.jsonread import JSONRefused, read_json

LAUGHS = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(
            f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]"
            for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
        ),
        "",
    ]
)


@pytest.fixture
def gateway(tmp_path: Path, storage_url: str) -> Iterator[Gateway]:
    """`metergate serve` on the test's backend."""
    with upstream() as (url, _), serve(config(url, storage_url), tmp_path) as gw:
        yield gw


def test_admin_json_with_a_duplicate_key_is_422_and_changes_nothing(gateway: Gateway) -> None:
    """`{"amount":1,"amount":99999}` is refused naming the duplicate key; the balance is unchanged."""
    before = balance(gateway, "acme")
    r = gateway.admin_call(
        "POST",
        "/v1/customers/acme/balances/credits/topup",
        content=b'{"amount":1,"amount":99999}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422
    assert "duplicate key 'amount'" in r.json()["errors"][0]["message"]
    assert balance(gateway, "acme") == before


def test_admin_json_nested_deeper_than_32_levels_is_422(gateway: Gateway) -> None:
    """100,000 nested `[` answer 422 naming the nesting, not 500."""
    r = gateway.admin_call(
        "POST",
        "/v1/customers/acme/balances/credits/topup",
        content=b"[" * 100_000,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422
    assert "nested deeper than 32 levels" in r.json()["errors"][0]["message"]


def test_the_same_json_written_another_way_replays_instead_of_409(gateway: Gateway) -> None:
    """The admin Idempotency-Key fingerprint covers the parsed JSON, not its spelling."""
    path = "/v1/customers/acme/balances/credits/topup"
    headers = {"content-type": "application/json", "idempotency-key": "topup-1"}
    first = gateway.admin_call("POST", path, content=b'{"amount": 7}', headers=headers)
    again = gateway.admin_call("POST", path, content=b'{ "amount":7 }\n', headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    other = gateway.admin_call("POST", path, content=b'{"amount": 8}', headers=headers)
    assert other.status_code == 409


def test_the_admin_401_names_its_scheme(gateway: Gateway) -> None:
    """A call without the admin token is 401 with `WWW-Authenticate: Bearer realm=...`."""
    r = httpx.get(gateway.admin + "/v1/customers/acme", timeout=10)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="metergate-admin"'


def test_the_ledger_of_an_unknown_customer_is_404(gateway: Gateway) -> None:
    """`GET /v1/customers/nobody/ledger` is 404 not-found, not an empty 200."""
    r = gateway.admin_call("GET", "/v1/customers/nobody/ledger")
    assert r.status_code == 404
    assert r.json()["type"] == "urn:metergate:problem:not-found"
    assert gateway.admin_call("GET", "/v1/customers/acme/ledger").status_code == 200


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b'{"a": {"b": 1, "b": 2}}', "duplicate key 'b'"),
        (b"[" * 33 + b"]" * 33, "nested deeper than 32 levels"),
        (b'{"s": "' + b"[" * 100 + b'"}', None),
        (b"\xff", "not UTF-8 JSON"),
    ],
)
def test_the_json_reader(raw: bytes, problem: str | None) -> None:
    """Duplicates and depth are refused by name; brackets inside strings do not nest."""
    if problem is None:
        assert read_json(raw) == {"s": "[" * 100}
        return
    with pytest.raises(JSONRefused, match=problem):
        read_json(raw)


def test_a_billion_laughs_config_is_refused_by_check(tmp_path: Path) -> None:
    """`metergate check` on a "billion laughs" YAML file exits with an error naming the alias."""
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    checked = subprocess.run(
        [sys.executable, "-m", "metergate", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,  # a hang detector only
    )
    assert checked.returncode != 0
    assert "expands to more than 10000 nodes" in checked.stdout + checked.stderr


def test_aliases_within_the_limits_still_load(tmp_path: Path) -> None:
    """Ordinary anchors and aliases (a shared tier list) load as before."""
    path = tmp_path / "aliases.yaml"
    path.write_text(
        "metrics: {calls: {type: CumulativeCounter}}\n"
        "plans:\n"
        "  a: {assets: {calls: {period: month, tiers: &t [{from: 0, level: Normal, "
        "policy: NotifyOnly}]}}}\n"
        "  b: {assets: {calls: {period: month, tiers: *t}}}\n"
    )
    cfg = load_config(path)
    assert cfg.plans["a"].assets["calls"].tiers == cfg.plans["b"].assets["calls"].tiers


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: &a [*a]\n", "contains it"),
        ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ],
)
def test_recursive_and_deep_yaml_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    """A self-referencing alias and absurd nesting are config errors, not crashes."""
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_config(path)
