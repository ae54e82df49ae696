"""The admin API against its own OpenAPI document: no generated input gets a 500."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from tests.gateway.test_proxy import gateway_config

from metergate.admin import admin_app

TOKEN = "schema-admin-token-01234"

CONFIG = gateway_config("http://127.0.0.1:9")
CONFIG["storage"] = {"url": "memory://admin-schema"}
CONFIG["admin"] = {"token": TOKEN}

schema = schemathesis.openapi.from_asgi("/openapi.json", admin_app(CONFIG))


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_admin_api_fail(case: schemathesis.Case) -> None:
    """Every endpoint answers generated input with a deliberate status, never a server error."""
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500, (case.method, case.path, response.text)
