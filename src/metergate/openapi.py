"""The admin API's OpenAPI 3.1 document, built from its route table.

Every `$ref` resolves inside the document: request models are rendered with pydantic's
`ref_template` and their nested models moved to `components/schemas`. Every operation declares the
statuses its handler answers, each with its schema, and the security the server enforces.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

__all__ = ["build_document"]

REF = "#/components/schemas/{model}"

_INT = {"type": "integer"}
_STR = {"type": "string"}
_NULL_INT = {"type": ["integer", "null"]}
_NULL_STR = {"type": ["string", "null"]}
_DATE_TIME = {"type": "string", "format": "date-time"}


def _object(properties: dict[str, Any], *, extra: bool = False) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": extra,
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


_USAGE_FIELDS = {
    "value": _INT,
    "pending": _INT,
    "level": _STR,
    "policy": _STR,
    "period_start": _NULL_INT,
    "period_end": _NULL_INT,
    "limit": _NULL_INT,
    "remaining": _NULL_INT,
    "overage": _INT,
    "suspended": {"type": "boolean"},
}

RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Problem": {
        "description": "RFC 9457 problem details (`application/problem+json`).",
        "type": "object",
        "properties": {
            "type": {"type": "string", "format": "uri-reference"},
            "title": _STR,
            "status": _INT,
            "detail": _STR,
            "instance": _STR,
            "customer": _STR,
            "metric": _STR,
            "level": _STR,
            "policy": _STR,
            "retry_after": _INT,
            "errors": {
                "type": "array",
                "items": _object({"field": _STR, "message": _STR}),
            },
        },
        "required": ["type", "title", "status"],
        "additionalProperties": True,
    },
    "Balance": _object(
        {
            "amount": _INT,
            "held": _INT,
            "available": _INT,
            "overage": _INT,
            "unit": _STR,
            "suspended": {"type": "boolean"},
            "low_at": _NULL_INT,
        }
    ),
    "Entitlement": _object({"plan": _STR, "anchor": _NULL_STR, "timezone": _STR}),
    "EntitlementPeriod": _object(
        {"plan": _STR, "anchor": _NULL_STR, "timezone": _STR, "since": _DATE_TIME}
    ),
    "Customer": {
        **_object(
            {
                "id": _STR,
                "entitlement": _ref("Entitlement"),
                "history": {"type": "array", "items": _ref("EntitlementPeriod")},
                "api_keys": {"type": "array", "items": _STR},
                "balances": {"type": "object", "additionalProperties": _ref("Balance")},
            }
        ),
    },
    "IssuedKey": _object({"id": _STR, "key": _STR}),
    "AssetUsage": _object(_USAGE_FIELDS),
    "MetricUsage": _object({"customer": _STR, "metric": _STR, **_USAGE_FIELDS}),
    "Usage": _object(
        {
            "customer": _STR,
            "metrics": {"type": "object", "additionalProperties": _ref("AssetUsage")},
        }
    ),
    "Reservation": _object({"id": _STR, "expires_at": _INT}),
    "Ledger": _object(
        {"entries": {"type": "array", "items": {"type": "object", "additionalProperties": True}}}
    ),
    "Event": {
        "type": "object",
        "properties": {
            "id": _STR,
            "type": _STR,
            "customer": _STR,
            "time": _INT,
            "data": {"type": "object", "additionalProperties": True},
            "stream_id": _STR,
            "partition": _INT,
            "status": {"enum": ["queued", "dead"]},
            "destination": _STR,
            "reason": _STR,
            "dead_at": _STR,
        },
        "required": ["id", "type", "customer", "time", "data", "stream_id", "partition", "status"],
        "additionalProperties": False,
    },
    "Events": _object({"events": {"type": "array", "items": _ref("Event")}}),
    "Redelivered": _object({"redelivered": _STR}),
    "Health": _object(
        {"status": {"enum": ["ok", "degraded"]}, "storage": _STR, "workers_alive": _INT}
    ),
}

_PROBLEMS = {
    "400": "the request cannot be read",
    "401": "no or wrong admin token",
    "402": "the balance cannot cover the usage",
    "403": "the asset or balance is suspended, or the plan has no such metric",
    "404": "no such customer, balance, reservation or event",
    "409": "an Idempotency-Key replayed with another request, or a refused balance operation",
    "422": "the request is not valid (`errors` names each field)",
    "429": "the usage is refused by its quota or throttle",
    "503": "storage is unavailable",
}
_COMMON = ("401", "503")
_MUTATION = ("409", "422")

# handler name -> (success status, response schema or None, the problem statuses it may answer)
OPERATIONS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "put_customer": ("200", "Customer", (*_MUTATION,)),
    "get_customer": ("200", "Customer", ("404",)),
    "issue_key": ("201", "IssuedKey", ("404", *_MUTATION)),
    "revoke_key": ("204", None, ("404", *_MUTATION)),
    "put_entitlement": ("200", "Customer", ("404", *_MUTATION)),
    "get_usage": ("200", "Usage", ("404",)),
    "post_usage": ("200", "MetricUsage", ("402", "403", "404", "429", *_MUTATION)),
    "suspend_asset": ("200", "MetricUsage", ("404", *_MUTATION)),
    "get_balance": ("200", "Balance", ("404",)),
    "move_balance": ("200", "Balance", ("404", *_MUTATION)),
    "flag_balance": ("200", "Balance", ("404", *_MUTATION)),
    "reserve": ("201", "Reservation", ("402", "403", "404", *_MUTATION)),
    "close_reservation": ("200", "Balance", ("404", *_MUTATION)),
    "ledger": ("200", "Ledger", ("404", "422")),
    "events": ("200", "Events", ("422",)),
    "redeliver": ("202", "Redelivered", ("404", *_MUTATION)),
}

_SUCCESS = {"200": "OK", "201": "Created", "202": "Accepted", "204": "No Content"}
_LIMIT = {
    "name": "limit",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 100},
}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Replays the first response for a retry with the same request.",
    "schema": {"type": "string"},
}


def _problem_response(status: str) -> dict[str, Any]:
    return {
        "description": _PROBLEMS[status],
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


def _json_response(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _body_schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, str]:
    """Render a request model under components/schemas, its nested models beside it."""
    schema = model.model_json_schema(ref_template=REF)
    for name, nested in schema.pop("$defs", {}).items():
        components.setdefault(name, nested)
    components[model.__name__] = schema
    return _ref(model.__name__)


def _operation(
    method: str,
    path: str,
    name: str,
    mutation: bool,
    model: type[BaseModel] | None,
    summary: str,
    components: dict[str, Any],
) -> dict[str, Any]:
    success, schema, problems = OPERATIONS[name]
    responses: dict[str, Any] = {
        success: _json_response(_SUCCESS[success], schema)
        if schema
        else {"description": _SUCCESS[success]}
    }
    for status in sorted({*problems, *_COMMON}):
        responses[status] = _problem_response(status)
    params: list[dict[str, Any]] = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for p in re.findall(r"\{(\w+)\}", path)
    ]
    if name in ("ledger", "events"):
        params.append(_LIMIT)
    if mutation:
        params.append(_IDEMPOTENCY_KEY)
    op: dict[str, Any] = {
        "operationId": name + "_" + re.sub(r"\W+", "_", path).strip("_"),
        "summary": summary,
        "security": [{"bearer": []}],
        "parameters": params,
        "responses": responses,
    }
    if model is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _body_schema(model, components)}},
        }
    return op


def build_document(
    routes: Sequence[tuple[str, str, str, bool, type[BaseModel] | None, str]],
) -> dict[str, Any]:
    """Return the OpenAPI document of the admin routes (paths with `{action:a|b}` expanded)."""
    components: dict[str, Any] = dict(RESPONSE_SCHEMAS)
    paths: dict[str, Any] = {}
    for method, template, name, mutation, model, summary in routes:
        for path in _expand(template):
            op = _operation(method, path, name, mutation, model, summary, components)
            paths.setdefault(path, {})[method.lower()] = op
    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "summary": "Health: storage reachable, workers alive",
            "security": [],
            "responses": {
                "200": _json_response("healthy", "Health"),
                "503": _json_response("storage is unreachable", "Health"),
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "security": [{"bearer": []}],
            "responses": {
                "200": {
                    "description": "Prometheus text exposition",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "401": _problem_response("401"),
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "security": [],
            "responses": {
                "200": {
                    "description": "the OpenAPI document",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "metergate admin API", "version": "1"},
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": dict(sorted(components.items())),
        },
        "paths": paths,
    }


def _expand(path: str) -> list[str]:
    match = re.search(r"\{(\w+):([^}]+)\}", path)
    if not match:
        return [path]
    return [path[: match.start()] + c + path[match.end() :] for c in match.group(2).split("|")]
