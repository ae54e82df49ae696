"""The libyaml loader and the pure-Python loader give the same config and the same errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.security.test_parsing import LAUGHS

import metergate.config
from metergate.config import ConfigError, GatewayConfig, load_config

BAD = Path(__file__).parent.parent / "configs" / "bad"

pytestmark = pytest.mark.skipif(
    metergate.config._CLoader is None, reason="PyYAML without libyaml (or without its depth cap)"
)

GOOD = """\
metrics: {calls: {type: CumulativeCounter}}
plans:
  a: &plan
    assets:
      calls: {period: month, balance: credits, tiers: &t [{from: 0, level: Normal,
        policy: NotifyOnly, price: {per_unit: 1}}]}
  b: *plan
  c:
    assets:
      calls:
        <<: {period: week, balance: credits}
        tiers: *t
customers:
  acme:
    api_keys: [plain-key, 'sha256:%s']
    entitlement: {plan: a, anchor: 2026-01-15T00:00:00, timezone: Europe/Paris}
    balances: {credits: {amount: 10, low_at: 2}}
  "caf\\u00e9 : {x}":
    entitlement: {plan: c}
    balances:
      credits: &b {amount: 0x10, overage: 1_000}
routes:
  - {path: "/v1/{rest:path}", meter: [{metric: calls}]}
""" % ("0" * 64)


def many(count: int) -> str:
    lines = [
        "metrics: {calls: {type: CumulativeCounter}}",
        "plans: {p: {assets: {calls: {period: month, balance: credits, tiers: [{from: 0, "
        "level: Normal, policy: NotifyOnly}]}}}}",
        "customers:",
    ]
    for i in range(count):
        lines += [
            f"  c{i}:",
            f"    api_keys: [key-{i}]",
            "    entitlement: {plan: p}",
            f"    balances: {{credits: {{amount: {i}}}}}",
        ]
    return "\n".join(lines) + "\n"


HOSTILE = {
    "laughs": LAUGHS,
    "recursive": "a: &a [*a]\n",
    "recursive_mapping": "a: &a {b: *a}\n",
    "deep_flow": "x: " + "[" * 5000 + "]" * 5000 + "\n",
    "deep_block": "".join(" " * i + "k:\n" for i in range(3000)),
    "deeper_than_the_fast_path": "x: " + "[" * 200 + "]" * 200 + "\n",
    "wide_alias": "a: &a [" + ", ".join(["1"] * 10_001) + "]\nb: *a\n",
    "big_alias": "a: &a ["
    + ", ".join([f'"{"x" * 600_000}"'] * 3)
    + "]\n"
    + "".join(f"b{i}: *a\n" for i in range(6)),
    "duplicate": "metrics: {}\nmetrics: {}\n",
    "duplicate_nested": "plans:\n  a: {assets: {}}\n  a: {assets: {}}\n",
    "duplicate_after_merge": "x: &x {a: 1}\ny:\n  <<: *x\n  b: 1\n  b: 2\n",
    "undefined_alias": "a: *nothing\n",
    "syntax": "a: {b: c: d}\n",
    "tab": "a:\n\tb: 1\n",
    "unhashable_key": "? [a]\n: 1\n",
    "not_a_mapping": "- a\n- b\n",
    "python_tag": "a: !!python/object/apply:os.system ['true']\n",
    "two_documents": "a: 1\n---\nb: 2\n",
    "empty": "",
    "comment_only": "# nothing\n",
}


def both(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """Load the file with the libyaml loader, then with the pure loader: configs or errors."""

    def outcome() -> Any:
        try:
            return load_config(path, env={})
        except ConfigError as exc:
            return ("error", str(exc))

    fast = outcome()
    with monkeypatch.context() as patch:
        patch.setattr(metergate.config, "_CLoader", None)
        pure = outcome()
    return fast, pure


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_yaml_is_refused_alike(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Aliases past the limits, recursion, nesting, duplicate keys, bad syntax and unsafe tags
    give the pure loader's answer word for word with either loader."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(HOSTILE[name])
    fast, pure = both(path, monkeypatch)
    assert fast == pure


@pytest.mark.parametrize("path", sorted(BAD.glob("*.yaml")), ids=lambda p: p.name)
def test_bad_configs_say_the_same(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every broken example config gets the same errors from either loader."""
    fast, pure = both(path, monkeypatch)
    assert fast == pure
    assert fast[0] == "error"


@pytest.mark.parametrize("text", [GOOD, many(300)], ids=["anchors", "many"])
def test_good_configs_load_alike_without_the_pure_loader(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config with anchors, merges, quoting and number forms, and one with many customers,
    load to the same config, and the libyaml path needs no help from the pure loader."""
    path = tmp_path / "good.yaml"
    path.write_text(text)
    fast, pure = both(path, monkeypatch)
    assert isinstance(fast, GatewayConfig)
    assert fast == pure

    class Refused(metergate.config._LimitedLoader):
        def __init__(self, stream: Any) -> None:
            raise AssertionError("the pure loader was used")

    monkeypatch.setattr(metergate.config, "_LimitedLoader", Refused)
    assert load_config(path, env={}) == fast


def test_the_hostile_cases_fail_on_the_fast_path_too() -> None:
    """Each limit is seen on the composed document itself, not only by the pure loader."""
    for name in ("laughs", "recursive", "wide_alias", "big_alias", "deeper_than_the_fast_path"):
        with pytest.raises(Exception):  # noqa: B017 - any refusal sends it to the pure loader
            yaml.load(HOSTILE[name], Loader=metergate.config._CLoader)
