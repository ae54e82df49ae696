"""Tests for the config loader: one bad file per rule, the example, ${ENV} and key hashing."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from metergate.config import (
    ConfigError,
    GatewayConfig,
    hash_api_key,
    load_config,
    parse_config,
    stored_api_key,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "gateway.yaml"
BAD = ROOT / "tests" / "configs" / "bad"
TOKEN = "t0k3n-for-tests-0123456789"
MINIMAL: dict[str, Any] = {
    "metrics": {"calls": {"type": "CumulativeCounter"}},
    "plans": {
        "basic": {
            "assets": {
                "calls": {
                    "period": "month",
                    "tiers": [{"from": 0, "level": "Normal", "policy": "NotifyOnly"}],
                }
            }
        }
    },
    "customers": {"acme": {"entitlement": {"plan": "basic"}}},
}

# Each bad file breaks exactly one rule; this is everything `load_config` must say about it.
EXPECTED: dict[str, list[str]] = {
    # Reading and parsing the file.
    "yaml_syntax.yaml": [
        "cannot parse the file: line 4, column 6: expected ',' or '}', but got ':'"
    ],
    "yaml_duplicate_key.yaml": ["cannot parse the file: line 4, column 3: duplicate key 'calls'"],
    "json_syntax.json": ["cannot parse the file: line 1, column 23: Expecting value"],
    "json_duplicate_key.json": ["cannot parse the file: duplicate key 'unmatched'"],
    "toml_syntax.toml": ["cannot parse the file: Invalid value (at line 3, column 8)"],
    "top_level_not_mapping.yaml": ["the top level must be a mapping"],
    # Keys and types.
    "unknown_key.yaml": ["ratelimit: unknown key 'ratelimit'"],
    "unknown_key_close_match.yaml": [
        "plans.basic.assets.calls.tiers[1].ratelimit: unknown key 'ratelimit'; did you mean 'rate'?"
    ],
    "key_missing.yaml": ["metrics.calls.type: is required"],
    "integer_float.yaml": ["plans.pro.assets.tokens.tiers[1].from: must be an integer, not 1.5"],
    "integer_string.toml": [
        "plans.basic.assets.calls.tiers[1].from: must be an integer, not '800'"
    ],
    "amount_negative.yaml": ["customers.acme.balances.credits.amount: must be at least 0, not -5"],
    "amount_too_large.yaml": [
        "plans.basic.assets.calls.tiers[1].from: "
        "must be at most 9007199254740991, not 9007199254740992"
    ],
    "choice_unknown.yaml": [
        "plans.basic.assets.calls.tiers[1].policy: must be 'NotifyOnly', 'AllowWithOverage', "
        "'AllowWithGrace', 'RateLimit', 'Deny' or 'SuspendUsage', not 'Notify'"
    ],
    "tiers_empty.yaml": ["plans.basic.assets.calls.tiers: must not be empty"],
    "mapping_expected.yaml": ["metrics: must be a mapping, not ['calls']"],
    "name_not_string.yaml": ["customers.12345: the name 12345 must be a string (quote it)"],
    "period_unknown.yaml": [
        "plans.basic.assets.calls.period: must be 'day', 'week', 'month' or 'year', not 'hour'"
    ],
    "anchor_not_datetime.yaml": [
        "customers.acme.entitlement.anchor: "
        "must be a date-time like '2026-01-15T00:00:00', not 'next monday'"
    ],
    "duration_unit.yaml": [
        "plans.basic.assets.calls.tiers[1].rate.per: "
        "must be a duration like 90, '90s', '1m' or '100ms', not '1w'"
    ],
    "duration_float.json": [
        "usage_report_interval: must be a duration like 90, '90s', '1m' or '100ms', not 1.5"
    ],
    "duration_zero.yaml": ["routes[0].lease_ttl: must be longer than 0"],
    "cost_not_integer.yaml": ["routes[0].meter[0].cost: must be an integer or a mapping, not 1.5"],
    "cost_unknown_key.yaml": ["routes[0].meter[0].cost.default: unknown key 'default'"],
    "cost_reserve_float.yaml": [
        "routes[0].meter[0].cost.reserve: must be an integer or a mapping, not 0.5"
    ],
    "admin_token_short.yaml": ["admin.token: must be at least 16 characters long"],
    "env_missing.yaml": ["admin.token: environment variable METERGATE_TEST_UNSET_TOKEN is not set"],
    "storage_prefix.yaml": ["storage.prefix: may only contain letters, digits, '_', '.' and '-'"],
    "storage_url_scheme.yaml": [
        "storage.url: unsupported scheme 'postgres': "
        "use one of memory://, redis://, rediss://, unix://, redis+cluster://"
    ],
    "unmatched_value.yaml": ["unmatched: must be 'pass' or 'deny', not 'block'"],
    "timezone_unknown.yaml": [
        "customers.acme.entitlement.timezone: unknown timezone 'Europe/Atlantis'"
    ],
    "webhook_secret_prefix.yaml": ["webhooks[0].secret: must start with 'whsec_'"],
    "webhook_secret_base64.yaml": ["webhooks[0].secret: must be 'whsec_' followed by base64"],
    "webhook_secret_length.yaml": ["webhooks[0].secret: must encode 24 to 64 bytes, not 5"],
    "webhook_url.yaml": ["webhooks[0].url: must be an http:// or https:// URL"],
    "trusted_proxy_not_cidr.yaml": [
        "proxy.trusted_proxies[1]: 'localhost' is not an IP network like '10.0.0.0/8'"
    ],
    "route_path_relative.yaml": ["routes[0].path: must start with '/'"],
    "route_path_segment.yaml": [
        "routes[0].path: segment '{name}.json' must be literal text, '{name}' or '{name:path}'"
    ],
    "route_path_parameter_twice.yaml": ["routes[0].path: parameter 'id' appears twice"],
    "api_key_hash_malformed.yaml": [
        "customers.acme.api_keys[0]: "
        "starts with 'sha256:' but is not followed by 64 lowercase hex digits"
    ],
    # Rules across fields and sections.
    "tiers_first_not_zero.yaml": [
        "plans.basic.assets.calls.tiers[0].from: the first tier must start at 0"
    ],
    "tiers_not_ascending.yaml": [
        "plans.basic.assets.calls.tiers[2].from: tiers must ascend: 800 is not above 800"
    ],
    "asset_metric_undefined.yaml": [
        "plans.basic.assets.calls: metric 'calls' is not defined in metrics"
    ],
    "customer_plan_undefined.yaml": [
        "customers.acme.entitlement.plan: plan 'gold' is not defined in plans"
    ],
    "customer_balance_missing.yaml": [
        "customers.acme.balances: plan 'basic' draws balance 'credits', which is missing"
    ],
    "route_metric_undefined.yaml": [
        "routes[0].meter[0].metric: metric 'tokens' is not defined in metrics"
    ],
    "route_metric_twice.yaml": ["routes[0].meter[1].metric: metric 'calls' is metered twice"],
    "grace_missing.yaml": ["plans.basic.assets.calls.tiers[1].grace: AllowWithGrace needs a grace"],
    "grace_misplaced.yaml": [
        "plans.basic.assets.calls.tiers[1].grace: grace only applies to AllowWithGrace"
    ],
    "rate_missing.yaml": [
        "plans.basic.assets.calls.tiers[1].rate: RateLimit needs a rate: {limit, per}"
    ],
    "rate_misplaced.yaml": [
        "plans.basic.assets.calls.tiers[1].rate: rate only applies to RateLimit"
    ],
    "price_not_counter.yaml": [
        "plans.basic.assets.seats.tiers[0].price: price is only valid on counters, not on a Gauge"
    ],
    "price_without_balance.yaml": [
        "plans.basic.assets.calls.tiers[0].price: a priced tier needs the asset's balance"
    ],
    "updown_period.yaml": [
        "plans.basic.assets.in_flight.period: an UpDownCounter is never reset by a period"
    ],
    "counter_period_missing.yaml": [
        "plans.basic.assets.calls.period: a TotalCounter needs a period"
    ],
    "cost_header_count.yaml": [
        "routes[0].meter[0].cost: give exactly one of header, response_header, response_json, "
        "response_trailer"
    ],
    "cost_reserve_missing.yaml": [
        "routes[0].meter[0].cost.reserve: response_header needs a reserve"
    ],
    "cost_reserve_misplaced.yaml": [
        "routes[0].meter[0].cost.reserve: reserve only applies to costs read from the response"
    ],
    "api_key_shared.yaml": ["customers.tinyco.api_keys[1]: customer 'acme' has the same key"],
    "cost_pointer_relative.yaml": [
        "routes[0].meter[0].cost.response_json: a JSON pointer starts with '/', not 'u'"
    ],
    "cost_pointer_escape.yaml": [
        "routes[0].meter[0].cost.reserve.request_json: "
        "'~' in a JSON pointer must be followed by 0 or 1 (~0, ~1)"
    ],
    "cost_request_reserve_default.yaml": [
        "routes[0].meter[0].cost.reserve.default: must be an integer, not '8k'"
    ],
    "cost_scan_misplaced.yaml": [
        "routes[0].meter[0].cost.max_scan_bytes: "
        "max_scan_bytes only applies to response_json or a request_json reserve"
    ],
}


def report(exc: ConfigError) -> list[str]:
    """Render a ConfigError's errors as the `path: message` lines `metergate check` prints."""
    return [f"{path}: {message}" if path else message for path, message in exc.errors]


def errors_of(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    """Return the `path: message` lines parse_config raises for `data`."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env or {})
    return report(info.value)


def toml_value(value: Any) -> str:
    """Write a value as TOML inline tables and arrays (JSON-quoted strings are TOML strings)."""
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return json.dumps(value)
    raise TypeError(f"no TOML for {value!r}")


def example_data() -> dict[str, Any]:
    """The example configuration as plain data."""
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    return data


@pytest.fixture
def admin_token(monkeypatch: pytest.MonkeyPatch) -> str:
    """Set METERGATE_ADMIN_TOKEN, which the example reads through ${ENV}."""
    monkeypatch.setenv("METERGATE_ADMIN_TOKEN", TOKEN)
    return TOKEN


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_reports_its_rule(name: str) -> None:
    """Each bad file is refused with exactly the expected `path: message` lines, naming the file."""
    with pytest.raises(ConfigError) as info:
        load_config(BAD / name, env={})
    assert report(info.value) == EXPECTED[name]
    assert info.value.source == str(BAD / name)


def test_every_bad_file_has_an_expectation() -> None:
    """No bad file goes untested and no expectation points at a missing file."""
    assert sorted(p.name for p in BAD.iterdir()) == sorted(EXPECTED)


def test_bad_files_cover_yaml_json_and_toml() -> None:
    """The rule files exercise all three formats the loader accepts."""
    assert {Path(name).suffix for name in EXPECTED} == {".yaml", ".json", ".toml"}


def test_example_loads_from_yaml(admin_token: str) -> None:
    """The example configuration is valid, with the admin token taken from the environment."""
    config = load_config(EXAMPLE)
    assert config.admin.token == admin_token
    assert sorted(config.metrics) == ["api_calls", "in_flight", "seats", "storage_gb", "tokens"]
    assert sorted(config.plans) == ["pro", "starter"]
    assert config.plans["pro"].assets["tokens"].tiers[1].grace == 250_000
    assert config.plans["starter"].assets["api_calls"].tiers[2].rate is not None
    assert config.plans["starter"].assets["api_calls"].tiers[2].rate.per == 60_000
    assert config.usage_report_interval == 60_000
    assert [route.path for route in config.routes] == [
        "/v1/chat/completions",
        "/v1/{rest:path}",
        "/healthz",
    ]


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_example_loads_the_same_from_json_and_toml(
    suffix: str, tmp_path: Path, admin_token: str
) -> None:
    """The example written as JSON or TOML loads to the same configuration as the YAML."""
    data = example_data()
    if suffix == ".json":
        text = json.dumps(data, indent=2)
    else:
        text = "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in data.items())
    path = tmp_path / f"gateway{suffix}"
    path.write_text(text, encoding="utf-8")
    assert load_config(path) == load_config(EXAMPLE)


def test_example_without_its_env_var_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the example without METERGATE_ADMIN_TOKEN names the variable, and nothing else."""
    monkeypatch.delenv("METERGATE_ADMIN_TOKEN", raising=False)
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE)
    assert report(info.value) == [
        "admin.token: environment variable METERGATE_ADMIN_TOKEN is not set"
    ]


def test_plain_api_keys_are_hashed_on_load(admin_token: str) -> None:
    """A plain key is stored as `sha256:` of it; the example's hash is that of "acme-dev-key"."""
    config = load_config(EXAMPLE)
    acme_digest = hashlib.sha256(b"acme-dev-key").hexdigest()
    tiny_digest = hashlib.sha256(b"tiny-dev-key").hexdigest()
    assert config.customers["acme"].api_keys == [f"sha256:{acme_digest}"]
    assert config.customers["tinyco"].api_keys == [f"sha256:{tiny_digest}"]
    assert hash_api_key("acme-dev-key") == config.customers["acme"].api_keys[0]


def test_hashed_api_keys_in_the_config_are_kept_but_never_keys() -> None:
    """A configured `sha256:` key is stored as written; presented, it is hashed like any key."""
    digest = hash_api_key("k")
    assert stored_api_key(digest) == digest
    assert hash_api_key(digest) != digest


def test_env_expands_inside_strings() -> None:
    """`${NAME}` is replaced where it appears, also in the middle of a string and in lists."""
    data = {
        **MINIMAL,
        "storage": {"url": "redis://${REDIS_HOST}:6379/0"},
        "proxy": {"trusted_proxies": ["${TRUSTED}"]},
    }
    config = parse_config(data, env={"REDIS_HOST": "cache", "TRUSTED": "10.0.0.0/8"})
    assert config.storage.url == "redis://cache:6379/0"
    assert config.proxy.trusted_proxies == ["10.0.0.0/8"]


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit mapping, `${NAME}` reads os.environ."""
    monkeypatch.setenv("METERGATE_TEST_PREFIX", "tenant7")
    config = parse_config({**MINIMAL, "storage": {"prefix": "${METERGATE_TEST_PREFIX}"}})
    assert config.storage.prefix == "tenant7"


def test_every_missing_env_var_is_named_with_the_other_errors() -> None:
    """Each missing variable is named at its path, alongside unrelated errors, without echoes."""
    data = {
        **MINIMAL,
        "storage": {"url": "redis://${HOST}:${PORT}/0"},
        "admin": {"token": "${TOKEN}"},
        "unmatched": "block",
    }
    assert errors_of(data) == [
        "storage.url: environment variable HOST is not set",
        "storage.url: environment variable PORT is not set",
        "admin.token: environment variable TOKEN is not set",
        "unmatched: must be 'pass' or 'deny', not 'block'",
    ]


def test_user_keys_that_look_like_union_members_keep_their_names() -> None:
    """A metric named like a pydantic union member (`int`, `CostConfig`) stays in the path."""
    data = {"metrics": {"int": {"type": "Counter"}, "CostConfig": {"type": "Counter"}}}
    expected = "must be 'CumulativeCounter', 'TotalCounter', 'Gauge' or 'UpDownCounter'"
    assert errors_of(data) == [
        f"metrics.int.type: {expected}, not 'Counter'",
        f"metrics.CostConfig.type: {expected}, not 'Counter'",
    ]


@pytest.mark.parametrize(
    ("cost", "expected"),
    [
        ("x", "routes[0].meter[0].cost: must be an integer or a mapping, not 'x'"),
        ([1], "routes[0].meter[0].cost: must be an integer or a mapping, not [1]"),
        (-1, "routes[0].meter[0].cost: must be at least 0, not -1"),
        ({"header": 5}, "routes[0].meter[0].cost.header: must be a string, not 5"),
    ],
)
def test_cost_union_errors_have_clean_paths(cost: Any, expected: str) -> None:
    """Errors in `cost` (an integer or a mapping) never show pydantic's union member names."""
    data = {**MINIMAL, "routes": [{"path": "/v1", "meter": [{"metric": "calls", "cost": cost}]}]}
    assert errors_of(data) == [expected]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("reserve_ttl", "-5s", "must be a duration like 90, '90s', '1m' or '100ms', not '-5s'"),
        ("reserve_ttl", True, "must be a duration like 90, '90s', '1m' or '100ms', not True"),
        ("lease_ttl", -1, "must be longer than 0"),
        ("lease_ttl", "1.5m", "must be a duration like 90, '90s', '1m' or '100ms', not '1.5m'"),
    ],
)
def test_duration_errors_have_clean_paths(field: str, value: Any, expected: str) -> None:
    """Bad durations, optional or not, are reported at the field itself."""
    data = {**MINIMAL, "routes": [{"path": "/v1", field: value}]}
    assert errors_of(data) == [f"routes[0].{field}: {expected}"]


@pytest.mark.parametrize(
    ("written", "ms"),
    [
        (90, 90_000),
        ("90", 90_000),
        ("90s", 90_000),
        ("1m", 60_000),
        ("100ms", 100),
        ("2h", 7_200_000),
        ("1d", 86_400_000),
        (" 5 s ", 5_000),
    ],
)
def test_durations_are_read_as_milliseconds(written: Any, ms: int) -> None:
    """A duration is an integer of seconds or `<int><ms|s|m|h|d>`, held in milliseconds."""
    config = parse_config(
        {**MINIMAL, "proxy": {"timeout_s": 30}, "routes": [{"path": "/", "reserve_ttl": written}]},
        env={},
    )
    assert config.routes[0].reserve_ttl == ms


def test_route_templates_accept_named_and_path_parameters() -> None:
    """`{name}` and `{name:path}` segments are valid route templates."""
    routes = [{"path": "/v1/{org}/files/{rest:path}"}, {"path": "/"}, {"path": "/a/{b}/c"}]
    config = parse_config({**MINIMAL, "routes": routes}, env={})
    assert [r.path for r in config.routes] == ["/v1/{org}/files/{rest:path}", "/", "/a/{b}/c"]


def test_trusted_proxies_are_normalised() -> None:
    """A CIDR with host bits set is accepted and stored as its network."""
    config = parse_config({**MINIMAL, "proxy": {"trusted_proxies": ["10.1.2.3/8", "::1"]}})
    assert config.proxy.trusted_proxies == ["10.0.0.0/8", "::1/128"]


@pytest.mark.parametrize("size", [24, 25, 64])
def test_webhook_secrets_of_24_to_64_bytes_are_accepted_padded_or_not(size: int) -> None:
    """A `whsec_` secret of 24 to 64 bytes is valid with or without its base64 padding."""
    encoded = base64.b64encode(bytes(range(size))).decode()
    for secret in (encoded, encoded.rstrip("=")):
        hook = {"url": "https://billing.example.com/hooks", "secret": f"whsec_{secret}"}
        config = parse_config({**MINIMAL, "webhooks": [hook]}, env={})
        assert config.webhooks[0].secret == f"whsec_{secret}"


def test_structure_errors_are_all_reported_in_one_go() -> None:
    """Several structural problems are reported together, each at its own path."""
    data = {
        "storage": {"timeout_ms": 0, "on_failure": "maybe"},
        "metrics": {"calls": {"type": "CumulativeCounter", "units": "requests"}},
        "routes": [{"meter": []}],
    }
    assert errors_of(data) == [
        "storage.timeout_ms: must be greater than 0, not 0",
        "storage.on_failure: must be 'closed' or 'open', not 'maybe'",
        "metrics.calls.units: unknown key 'units'; did you mean 'unit'?",
        "routes[0].path: is required",
    ]


def test_cross_check_errors_are_all_reported_in_one_go() -> None:
    """Several cross-section problems are reported together, in the order of the file."""
    data = {
        **MINIMAL,
        "customers": {"acme": {"entitlement": {"plan": "gold"}}},
        "routes": [{"path": "/v1", "meter": [{"metric": "tokens"}]}],
    }
    assert errors_of(data) == [
        "customers.acme.entitlement.plan: plan 'gold' is not defined in plans",
        "routes[0].meter[0].metric: metric 'tokens' is not defined in metrics",
    ]


def test_a_gauge_may_take_a_period() -> None:
    """A Gauge's period is optional (it sets the billing window of its peak and last reading)."""
    data = {
        "metrics": {"seats": {"type": "Gauge"}},
        "plans": {
            "basic": {
                "assets": {
                    "seats": {
                        "period": "month",
                        "tiers": [{"from": 0, "level": "Normal", "policy": "NotifyOnly"}],
                    }
                }
            }
        },
    }
    assert parse_config(data, env={}).plans["basic"].assets["seats"].period == "month"


def test_yaml_anchors_and_merge_keys_still_work(tmp_path: Path) -> None:
    """The duplicate-key check leaves YAML anchors and `<<` merges alone."""
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "metrics:\n"
        "  calls: &counter {type: CumulativeCounter}\n"
        "  tokens: {<<: *counter, unit: tokens}\n",
        encoding="utf-8",
    )
    config = load_config(path, env={})
    assert config.metrics["tokens"].type == "CumulativeCounter"
    assert config.metrics["tokens"].unit == "tokens"


def test_an_empty_file_is_the_default_configuration(tmp_path: Path) -> None:
    """An empty YAML file is valid and means every default."""
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path, env={}) == GatewayConfig()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read the file: No such file or directory"),
        (b"\xff\xfe metrics", "cannot read the file: it is not UTF-8 text"),
    ],
)
def test_unreadable_files_are_config_errors(
    content: bytes | None, expected: str, tmp_path: Path
) -> None:
    """A missing or non-UTF-8 file is a ConfigError naming the file, not a crash."""
    path = tmp_path / "gateway.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert report(info.value) == [expected]
    assert str(info.value) == f"{path}: invalid (1 error)\n  {expected}"


def test_config_error_text_lists_each_error_under_a_header() -> None:
    """A ConfigError reads as a header with the count, then one indented line per error."""
    error = ConfigError([("a.b", "is required"), ("", "cannot read")], "gw.yaml")
    assert str(error) == "gw.yaml: invalid (2 errors)\n  a.b: is required\n  cannot read"


def test_config_models_are_frozen(admin_token: str) -> None:
    """A loaded configuration cannot be changed in place."""
    config = load_config(EXAMPLE)
    with pytest.raises(ValueError, match="frozen"):
        config.unmatched = "deny"
