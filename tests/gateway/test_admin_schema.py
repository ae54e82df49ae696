"""The admin API against its own OpenAPI document: usable by real consumers, no input makes it fail."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, find, settings
from openapi_spec_validator import validate
from schemathesis import checks
from tests.gateway.test_proxy import gateway_config

from metergate.admin import OPENAPI, admin_app

TOKEN = "schema-admin-token-01234"

CONFIG = gateway_config("http://127.0.0.1:9")
CONFIG["storage"] = {"url": "memory://admin-schema"}
CONFIG["admin"] = {"token": TOKEN}

schema = schemathesis.openapi.from_asgi("/openapi.json", admin_app(CONFIG))
QUIET = settings(
    database=None,
    max_examples=200,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_the_document_is_valid_and_every_ref_resolves() -> None:
    """openapi-spec-validator accepts the document and every `$ref` points inside it."""
    validate(OPENAPI)
    refs = _refs(OPENAPI)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in OPENAPI["components"]["schemas"], ref


def test_every_operation_declares_what_it_answers() -> None:
    """Created, accepted and no-content answers are declared; release takes no body; /metrics
    needs the token like the server says."""
    paths = OPENAPI["paths"]
    assert "201" in paths["/v1/customers/{id}/api-keys"]["post"]["responses"]
    assert "201" in paths["/v1/customers/{id}/balances/{name}/reservations"]["post"]["responses"]
    assert "202" in paths["/v1/events/{eid}/redeliver"]["post"]["responses"]
    assert "204" in paths["/v1/customers/{id}/api-keys/{key_id}"]["delete"]["responses"]
    assert "requestBody" not in paths["/v1/reservations/{rid}/release"]["post"]
    assert paths["/v1/reservations/{rid}/commit"]["post"]["requestBody"]["required"] is True
    assert paths["/metrics"]["get"]["security"] == [{"bearer": []}]
    assert paths["/healthz"]["get"]["security"] == []
    for path, item in paths.items():
        for method, op in item.items():
            for status, answer in op["responses"].items():
                if status != "204":
                    assert answer.get("content"), (method, path, status)


@schema.parametrize()
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_admin_api_fail(case: schemathesis.Case) -> None:
    """Every endpoint answers generated input with a declared status, media type and schema."""
    # A schema cannot say which plans or customers exist: valid-looking input may be 404 or 422.
    # Unknown query parameters are ignored, as HTTP APIs do, and every case carries the token.
    case.call_and_validate(
        headers={"Authorization": f"Bearer {TOKEN}"},
        excluded_checks=[checks.positive_data_acceptance, checks.negative_data_rejection],
    )


def test_generated_cases_send_bodies() -> None:
    """schemathesis generates a JSON body for every operation that takes one (with `$defs` at the
    wrong level it generated none, so the body schemas were never exercised)."""
    for path, item in OPENAPI["paths"].items():
        for method, op in item.items():
            if "requestBody" not in op:
                continue
            strategy = schema[path][method.upper()].as_strategy()
            case = find(strategy, lambda c: isinstance(c.body, dict), settings=QUIET)
            assert isinstance(case.body, dict), (method, path)


def test_the_response_checker_refuses_what_the_document_does_not_say() -> None:
    """The openapi-core hook used by the admin tests fails an undeclared status or a wrong shape."""
    import httpx
    import pytest
    from openapi_core.exceptions import OpenAPIError
    from tests.gateway.openapi_check import response_checker

    check = response_checker(OPENAPI)
    request = httpx.Request("GET", "http://admin.test/v1/customers/c/balances/credits")
    good = {"amount": 1, "held": 0, "available": 1, "overage": 0, "unit": "credits"}
    check(httpx.Response(200, json={**good, "suspended": False, "low_at": None}, request=request))
    for wrong in (
        httpx.Response(418, json={}, request=request),
        httpx.Response(200, json={**good, "suspended": "no", "low_at": None}, request=request),
    ):
        with pytest.raises(OpenAPIError):
            check(wrong)
