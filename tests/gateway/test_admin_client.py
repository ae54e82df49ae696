"""A client generated from the served OpenAPI document by openapi-python-client, in a round trip."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.adapters.harness import serve_asgi
from tests.gateway.test_proxy import gateway_config

from metergate import admin_app

TOKEN = "client-admin-token-012345"
PACKAGE = "metergate_admin_client"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """Serve the admin API, generate a client package from its /openapi.json and import it."""
    config = gateway_config("http://127.0.0.1:9")
    config["storage"] = {"url": "memory://admin-client"}
    config["admin"] = {"token": TOKEN}
    root = tmp_path_factory.mktemp("client")
    with serve_asgi(admin_app(config)) as url:
        document = root / "openapi.json"
        document.write_bytes(httpx.get(f"{url}/openapi.json").content)
        result = subprocess.run(
            [
                *(sys.executable, "-m", "openapi_python_client", "generate"),
                *("--path", str(document), "--output-path", str(root / PACKAGE), "--meta", "none"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "warning" not in (result.stdout + result.stderr).lower(), result.stdout
        sys.path.insert(0, str(root))
        try:
            yield importlib.import_module(PACKAGE), url
        finally:
            sys.path.remove(str(root))
            for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
                del sys.modules[name]


def _op(package: Any, name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.api.default.{name}")


def test_every_operation_is_generated(generated: tuple[Any, str]) -> None:
    """openapi-python-client generates a function for every operation, none skipped."""
    from metergate.admin import OPENAPI

    package, _ = generated
    folder = Path(package.__file__).parent / "api" / "default"
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    operations = {
        op["operationId"].lower() for item in OPENAPI["paths"].values() for op in item.values()
    }
    assert modules == operations


def test_a_generated_client_round_trip(generated: tuple[Any, str]) -> None:
    """Create a customer, issue and revoke a key, top up, reserve and release, read it back:
    every answer parses into the generated models."""
    package, url = generated
    models = importlib.import_module(f"{PACKAGE}.models")
    with package.AuthenticatedClient(base_url=url, token=TOKEN) as client:
        body = models.CustomerBody.from_dict(
            {"entitlement": {"plan": "p"}, "balances": {"credits": {"amount": 100}}}
        )
        put = _op(package, "put_customer_v1_customers_id").sync(
            "gen-co", client=client, body=body, idempotency_key="gen-1"
        )
        assert isinstance(put, models.Customer) and put.entitlement.plan == "p"
        issued = _op(package, "issue_key_v1_customers_id_api_keys").sync_detailed(
            "gen-co", client=client
        )
        assert issued.status_code == 201 and isinstance(issued.parsed, models.IssuedKey)
        revoked = _op(package, "revoke_key_v1_customers_id_api_keys_key_id").sync_detailed(
            "gen-co", issued.parsed.id, client=client
        )
        assert revoked.status_code == 204
        topped = _op(package, "move_balance_v1_customers_id_balances_name_topup").sync(
            "gen-co", "credits", client=client, body=models.PositiveAmountBody(amount=5)
        )
        assert isinstance(topped, models.Balance) and topped.amount == 105
        held = _op(package, "reserve_v1_customers_id_balances_name_reservations").sync_detailed(
            "gen-co", "credits", client=client, body=models.ReservationBody(amount=30, ttl_s=60)
        )
        assert held.status_code == 201 and isinstance(held.parsed, models.Reservation)
        released = _op(package, "close_reservation_v1_reservations_rid_release").sync(
            held.parsed.id, client=client
        )
        assert isinstance(released, models.Balance) and released.held == 0
        missing = _op(package, "get_customer_v1_customers_id").sync("nobody", client=client)
        assert isinstance(missing, models.Problem) and missing.status == 404
        read = _op(package, "get_customer_v1_customers_id").sync("gen-co", client=client)
        assert isinstance(read, models.Customer)
        assert read.balances["credits"].available == 105
    anonymous = package.Client(base_url=url)
    with anonymous:
        refused = _op(package, "metrics").sync_detailed(client=anonymous)
        assert refused.status_code == 401
