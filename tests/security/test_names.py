"""Names: any character but control characters, and two different names never share a key."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.security.conftest import config, serve, upstream

from metergate.core.keys import Keys
from metergate.core.names import MAX_NAME_LENGTH, name_problem

NAMES = st.text(
    alphabet=st.characters(blacklist_categories=("Cc",), blacklist_characters="\x7f"),
    min_size=1,
    max_size=12,
).filter(lambda n: name_problem(n) is None) | st.sampled_from([":", "{", "}", "%", "%3A", "a:b"])


def two_customers() -> dict[str, Any]:
    """`zed` with balance `s24:credits` and `zed:s24` with balance `credits`: one key if joined."""
    tier = {"from": 0, "level": "Normal", "policy": "NotifyOnly"}
    return {
        "metrics": {"calls": {"type": "CumulativeCounter"}},
        "plans": {"p": {"assets": {"calls": {"period": "month", "tiers": [tier]}}}},
        "customers": {
            "zed": {"entitlement": {"plan": "p"}, "balances": {"s24:credits": {"amount": 100}}},
            "zed:s24": {"entitlement": {"plan": "p"}, "balances": {"credits": {"amount": 5}}},
        },
    }


def test_names_that_join_alike_are_two_balances(make_meter: Callable[..., Any]) -> None:
    """A withdrawal from `zed`'s `s24:credits` leaves `zed:s24`'s `credits` untouched, and both
    ledgers add up."""
    meter = make_meter(two_customers())
    assert meter.balance("zed", "s24:credits").amount == 100
    assert meter.balance("zed:s24", "credits").amount == 5
    meter.withdraw("zed", "s24:credits", 60)
    meter.topup("zed:s24", "credits", 1)
    assert meter.balance("zed", "s24:credits").amount == 40
    assert meter.balance("zed:s24", "credits").amount == 6
    for customer, name, amount in (("zed", "s24:credits", 40), ("zed:s24", "credits", 6)):
        entries = [e for e in meter.ledger(customer) if e["balance"] == name]
        assert sum(int(e["delta"]) for e in entries) == amount


def test_names_with_braces_and_colons_are_metered_apart(make_meter: Callable[..., Any]) -> None:
    """Customers `ac{me}`, `ac` and `{ac}` are metered on their own assets (Cluster included)."""
    cfg = two_customers()
    for cid in ("ac{me}", "ac", "{ac}", "a:c"):
        cfg["customers"][cid] = {"entitlement": {"plan": "p"}}
    meter = make_meter(cfg)
    for n, cid in enumerate(("ac{me}", "ac", "{ac}", "a:c"), start=1):
        for _ in range(n):
            assert meter.admit(cid, {"calls": 1}).allowed
    assert [meter.usage(c, "calls")["value"] for c in ("ac{me}", "ac", "{ac}", "a:c")] == [
        1,
        2,
        3,
        4,
    ]


@given(st.tuples(NAMES, NAMES, NAMES), st.tuples(NAMES, NAMES, NAMES))
def test_two_different_name_tuples_never_share_a_key(
    first: tuple[str, str, str], second: tuple[str, str, str]
) -> None:
    """Asset, balance, customer, ledger and key-list keys differ whenever the names differ."""
    keys = Keys("mg", 64)

    def all_keys(customer: str, metric: str, balance: str) -> set[str]:
        return {
            *keys.asset(customer, metric),
            *keys.balance(customer, balance),
            keys.customer(customer),
            keys.ledger(customer),
            keys.customer_keys(customer),
        }

    if first != second:
        # A tuple's keys may repeat between tuples only for the parts they share.
        a, b = all_keys(*first), all_keys(*second)
        if first[0] != second[0]:
            assert not a & b
        else:
            shared = {keys.customer(first[0]), keys.ledger(first[0]), keys.customer_keys(first[0])}
            if first[1] == second[1]:
                shared |= set(keys.asset(first[0], first[1]))
            if first[2] == second[2]:
                shared |= set(keys.balance(first[0], first[2]))
            assert a & b == shared


@given(NAMES, NAMES)
def test_a_name_never_moves_a_key_out_of_its_partitions_slot(customer: str, name: str) -> None:
    """The only `{...}` in a customer's keys is its partition's hash tag, whatever the names."""
    keys = Keys("mg", 64)
    tag = keys.tag(customer)
    for key in (*keys.asset(customer, name), *keys.balance(customer, name), keys.ledger(customer)):
        assert key.startswith(tag)
        assert "{" not in key[len(tag) :] and "}" not in key[len(tag) :]


def test_check_accepts_what_serve_serves(tmp_path: Path, storage_url: str) -> None:
    """A config with customer `ac{me}` passes `metergate check`, and `serve` serves everyone."""
    with upstream() as (url, _):
        cfg = config(url, storage_url)
        cfg["customers"]["ac{me}"] = {
            "api_keys": ["key-of-braces"],
            "entitlement": {"plan": "p"},
            "balances": {"credits": {"amount": 10}},
        }
        path = tmp_path / "braces.json"
        path.write_text(json.dumps(cfg))
        checked = subprocess.run(
            [sys.executable, "-m", "metergate", "check", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        with serve(cfg, tmp_path) as gw:
            assert gw.get("/v1/hello", key="key-of-braces").status_code == 200
            assert gw.get("/v1/hello").status_code == 200
            assert (
                gw.admin_call("GET", "/v1/customers/ac%7Bme%7D/balances/credits").json()["amount"]
                == 9
            )


@pytest.mark.parametrize(
    ("name", "problem"),
    [("a\x01b", "control characters"), ("x" * (MAX_NAME_LENGTH + 1), "1 to 200 characters")],
)
def test_check_refuses_a_bad_name_naming_it(tmp_path: Path, name: str, problem: str) -> None:
    """`metergate check` refuses a customer or balance name with control characters or too long."""
    cfg = config("http://127.0.0.1:9", "memory://")
    cfg["customers"]["acme"]["balances"] = {name: {"amount": 1}}
    cfg["customers"][name] = {"entitlement": {"plan": "p"}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    checked = subprocess.run(
        [sys.executable, "-m", "metergate", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode != 0
    out = checked.stdout + checked.stderr
    assert "customers.acme.balances" in out
    assert problem in out


def test_the_admin_api_applies_the_same_name_rules(tmp_path: Path) -> None:
    """The admin API refuses bad names with 422 naming the field, and takes `:` `{` `}`."""
    with upstream() as (url, _), serve(config(url, "memory://"), tmp_path) as gw:
        ent = {"entitlement": {"plan": "p"}}
        long_id = "x" * (MAX_NAME_LENGTH + 1)
        r = gw.admin_call("PUT", f"/v1/customers/{long_id}", json=ent)
        assert r.status_code == 422
        assert r.json()["errors"][0]["field"] == "customer"
        body = {**ent, "balances": {"bad\x07name": {"amount": 1}}}
        r = gw.admin_call("PUT", "/v1/customers/fine", json=body)
        assert r.status_code == 422
        assert "balances" in r.json()["errors"][0]["field"]
        body = {**ent, "balances": {"s24:{credits}": {"amount": 3}}}
        r = gw.admin_call("PUT", "/v1/customers/we%3Aird%7B%7D", json=body)
        assert r.status_code == 200, r.text
        got = gw.admin_call("GET", "/v1/customers/we%3Aird%7B%7D/balances/s24%3A%7Bcredits%7D")
        assert got.json()["amount"] == 3


def test_refunds_of_customers_whose_names_join_alike_undo_only_their_own(
    make_meter: Callable[..., Any],
) -> None:
    """Refunding `zed:s24`'s admission gives back its own credit and units, never `zed`'s
    `s24:credits`, and a name with braces is refunded in its own slot."""
    cfg = two_customers()
    tier = {"from": 0, "level": "Normal", "policy": "NotifyOnly", "price": {"per_unit": 2}}
    cfg["plans"]["priced"] = {
        "assets": {"calls": {"period": "month", "balance": "credits", "tiers": [tier]}}
    }
    cfg["plans"]["priced24"] = {
        "assets": {"calls": {"period": "month", "balance": "s24:credits", "tiers": [tier]}}
    }
    cfg["customers"]["zed"]["entitlement"] = {"plan": "priced24"}
    cfg["customers"]["zed:s24"]["entitlement"] = {"plan": "priced"}
    cfg["customers"]["{zed}"] = {
        "entitlement": {"plan": "priced"},
        "balances": {"credits": {"amount": 10}},
    }
    meter = make_meter(cfg)
    attempts = {}
    for cid in ("zed", "zed:s24", "{zed}"):
        attempts[cid] = meter.core.new_attempt()
        assert meter.admit(cid, {"calls": 1}, attempt=attempts[cid]).allowed
    assert meter.refund("zed:s24", attempts["zed:s24"]) == "refunded"
    assert meter.refund("{zed}", attempts["{zed}"]) == "refunded"
    assert meter.balance("zed:s24", "credits").amount == 5
    assert meter.balance("{zed}", "credits").amount == 10
    assert meter.balance("zed", "s24:credits").amount == 98
    assert [meter.usage(c, "calls")["value"] for c in ("zed", "zed:s24", "{zed}")] == [1, 0, 0]
