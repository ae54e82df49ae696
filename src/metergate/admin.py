"""The admin API (SPEC section 4): customers, keys, usage, balances, reservations, ledger, events."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from metergate.config import MAX_SAFE_INT, BalanceConfig, EntitlementConfig, Name
from metergate.core import directory
from metergate.core.errors import Conflict, InvalidAmount, NotFound, StorageUnavailable
from metergate.core.flows import Command
from metergate.core.http import problem
from metergate.core.jsonread import JSONRefused, canonical, read_json
from metergate.meter import AsyncMeter, ConfigSource, as_config
from metergate.observability import REGISTRY, WEBHOOK_BACKLOG
from metergate.openapi import build_document
from metergate.recovery import Recovery
from metergate.ui import dashboard_app

__all__ = ["admin_app"]

Handler = Callable[[Request], Awaitable[Response]]
Amount = Annotated[StrictInt, Field(ge=0, le=MAX_SAFE_INT)]
Positive = Annotated[StrictInt, Field(gt=0, le=MAX_SAFE_INT)]
IDEMPOTENCY_TTL_S = 86_400
CHALLENGE = 'Bearer realm="metergate-admin"'

logger = logging.getLogger("metergate")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CustomerBody(_Body):
    """`PUT /v1/customers/{id}`."""

    entitlement: EntitlementConfig
    balances: dict[Name, BalanceConfig] = {}


class EntitlementBody(_Body):
    """`PUT /v1/customers/{id}/entitlement`: any of plan, anchor, timezone."""

    plan: str | None = None
    anchor: datetime | None = None
    timezone: str | None = None


class UsageBody(_Body):
    """`POST /v1/customers/{id}/usage`."""

    metric: str
    value: Annotated[StrictInt, Field(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT)]


class AmountBody(_Body):
    """`{amount}` of top-ups, withdrawals and commits."""

    amount: Amount


class PositiveAmountBody(_Body):
    """`{amount}` that must be above 0."""

    amount: Positive


class ReservationBody(_Body):
    """`POST .../reservations`."""

    amount: Positive
    ttl_s: Positive = 300


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


def _answer(slug: str, status: int, detail: str, **extra: Any) -> Response:
    ans = problem(slug, status, detail, **extra)
    return Response(ans.body, ans.status, headers=dict(ans.headers))


def _invalid(errors: list[dict[str, str]]) -> Response:
    return _answer("invalid-request", 422, "the request is not valid", errors=errors)


async def _parse(request: Request, model: type[_Body]) -> Any:
    raw = await request.body()
    try:
        data = read_json(raw or b"{}")
    except JSONRefused as exc:
        return _invalid([{"field": "body", "message": str(exc)}])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "body"
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown field"
            errors.append({"field": field, "message": message})
        return _invalid(errors)


class AdminAPI:
    """The admin endpoints over one AsyncMeter."""

    def __init__(self, meter: AsyncMeter, token: str | None) -> None:
        self.meter = meter
        self.token = token
        # reservations whose reply was lost are cancelled in the background (see reserve)
        self.recovery = Recovery(meter)

    def authorized(self, request: Request) -> bool:
        """Check the bearer token in constant time."""
        if not self.token:
            return False
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.encode(), self.token.encode()
        )

    def guard(self, handler: Handler, *, mutation: bool = False) -> Handler:
        """Wrap a handler with auth, error mapping and (for mutations) Idempotency-Key replay."""

        async def endpoint(request: Request) -> Response:
            if not self.authorized(request):
                response = _answer("unauthenticated", 401, "a valid admin bearer token is required")
                # RFC 9110 11.6.1: a 401 names how to authenticate.
                response.headers["www-authenticate"] = CHALLENGE
                return response
            key = request.headers.get("idempotency-key") if mutation else None
            try:
                replay = await self._replay(request, key) if key else None
                if replay is not None:
                    return replay
                response = await handler(request)
            except InvalidAmount as exc:
                response = _invalid([{"field": exc.field, "message": exc.message}])
            except NotFound as exc:
                response = _answer("not-found", 404, str(exc).strip("'\""))
            except Conflict as exc:
                response = _answer(exc.slug, exc.status, exc.message)
            except StorageUnavailable:
                response = _answer("metering-unavailable", 503, "storage is unavailable")
            except Exception:
                # the outcome is unknown to the caller: a retry with the same key is safe
                logger.exception("metergate: admin %s %s failed", request.method, request.url.path)
                response = _answer("internal-error", 500, "the operation failed; retry it")
            if key and 200 <= response.status_code < 300:
                # the operation itself is idempotent in its script: a failure to remember the
                # response only means a retry runs it again, to the same result
                with contextlib.suppress(StorageUnavailable):
                    await self._remember(request, key, response)
            return response

        return endpoint

    async def _fingerprint(self, request: Request) -> str:
        # Over the parsed body, so the same JSON written another way is the same request.
        body = await request.body()
        with contextlib.suppress(JSONRefused):
            body = canonical(read_json(body)) if body else body
        return directory.fingerprint(request.method.encode() + request.url.path.encode() + body)

    def _idem_key(self, key: str) -> str:
        return f"{self.meter.core.keys.prefix}:admin-idempotency:{key}"

    async def _replay(self, request: Request, key: str) -> Response | None:
        stored = await self.meter.storage.run(Command(("GET", self._idem_key(key))))
        if not stored:
            return None
        record = json.loads(stored)
        if record["fingerprint"] != await self._fingerprint(request):
            return _answer(
                "idempotency-conflict", 409, "this Idempotency-Key was used with another request"
            )
        return Response(
            record["body"].encode(),
            record["status"],
            headers={"content-type": record["type"], "idempotent-replayed": "true"},
        )

    async def _remember(self, request: Request, key: str, response: Response) -> None:
        record = {
            "fingerprint": await self._fingerprint(request),
            "status": response.status_code,
            "type": response.headers.get("content-type", "application/json"),
            "body": bytes(response.body).decode(),
        }
        await self.meter.storage.run(
            Command(("SET", self._idem_key(key), json.dumps(record), "EX", str(IDEMPOTENCY_TTL_S)))
        )

    # -- customers ---------------------------------------------------------------------------

    async def put_customer(self, request: Request) -> Response:
        body = await _parse(request, CustomerBody)
        if isinstance(body, Response):
            return body
        cid = request.path_params["id"]
        spec = {"entitlement": body.entitlement, "balances": body.balances}
        await self.meter.put_customer(cid, spec)
        return await self.get_customer(request)

    async def get_customer(self, request: Request) -> Response:
        return _json(await self.customer(request.path_params["id"]))

    async def customer(self, cid: str) -> dict[str, Any]:
        """Return a customer as `GET /v1/customers/{id}` shows it (the dashboard reads it too)."""
        await self.meter.sync(cid)  # count what this process's allowances gave
        view = await self.meter.run(directory.customer_view(self.meter.core, cid))
        balances = {}
        for name in view["balances"]:
            try:
                balances[name] = (await self.meter.balance(cid, name)).as_dict()
            except NotFound:
                continue
        view["balances"] = balances
        return view

    async def issue_key(self, request: Request) -> Response:
        cid = request.path_params["id"]
        issued = await self.meter.run(directory.issue_api_key(self.meter.core, cid))
        return _json(issued, 201)

    async def revoke_key(self, request: Request) -> Response:
        cid, key_id = request.path_params["id"], request.path_params["key_id"]
        await self.meter.run(directory.revoke_api_key(self.meter.core, cid, key_id))
        return Response(status_code=204)

    async def put_entitlement(self, request: Request) -> Response:
        body = await _parse(request, EntitlementBody)
        if isinstance(body, Response):
            return body
        cid = request.path_params["id"]
        current = await self.meter.run(directory.find_entitlement(self.meter.core, cid))
        if current is None:
            raise NotFound(f"customer '{cid}' does not exist")
        await self.meter.set_entitlement(cid, body.plan or current.plan, body.anchor, body.timezone)
        return await self.get_customer(request)

    # -- usage -------------------------------------------------------------------------------

    async def get_usage(self, request: Request) -> Response:
        cid = request.path_params["id"]
        return _json({"customer": cid, "metrics": await self.usage(cid)})

    async def usage(self, cid: str) -> dict[str, dict[str, object]]:
        """Return a customer's usage per metric, as `GET /v1/customers/{id}/usage` shows it."""
        ent = await self.meter.run(directory.find_entitlement(self.meter.core, cid))
        if ent is None:
            raise NotFound(f"customer '{cid}' does not exist")
        return {m: await self.meter.usage(cid, m) for m in self.meter.core.plans[ent.plan]}

    async def post_usage(self, request: Request) -> Response:
        body = await _parse(request, UsageBody)
        if isinstance(body, Response):
            return body
        cid = request.path_params["id"]
        key = request.headers.get("idempotency-key")
        decision = await self.meter.record(cid, body.metric, body.value, key)
        if not decision.allowed:
            if decision.status == 401:
                raise NotFound(f"customer '{cid}' does not exist")
            refused = decision.assets.get(decision.metric or "")
            level, policy = decision.refused_by or (
                (refused.level, refused.policy) if refused else (None, None)
            )
            extra = {
                "retry_after": decision.retry_after,
                "metric": decision.metric,
                "level": level,
                "policy": policy,
            }
            return _answer(str(decision.problem), decision.status, decision.detail or "", **extra)
        usage = decision.assets[body.metric].as_dict()
        return _json({"customer": cid, "metric": body.metric, **usage})

    async def suspend_asset(self, request: Request) -> Response:
        cid, metric = request.path_params["id"], request.path_params["metric"]
        if request.path_params["action"] == "suspend":
            usage = await self.meter.suspend_asset(cid, metric)
        else:
            usage = await self.meter.resume_asset(cid, metric)
        return _json({"customer": cid, "metric": metric, **usage.as_dict()})

    # -- balances ----------------------------------------------------------------------------

    async def get_balance(self, request: Request) -> Response:
        state = await self.meter.balance(request.path_params["id"], request.path_params["name"])
        return _json(state.as_dict())

    async def move_balance(self, request: Request) -> Response:
        body = await _parse(request, PositiveAmountBody)
        if isinstance(body, Response):
            return body
        cid, name = request.path_params["id"], request.path_params["name"]
        key = request.headers.get("idempotency-key")
        if request.path_params["action"] == "topup":
            state = await self.meter.topup(cid, name, body.amount, key)
        else:
            state = await self.meter.withdraw(cid, name, body.amount, key)
        return _json(state.as_dict())

    async def flag_balance(self, request: Request) -> Response:
        cid, name = request.path_params["id"], request.path_params["name"]
        if request.path_params["action"] == "suspend":
            state = await self.meter.suspend_balance(cid, name)
        else:
            state = await self.meter.resume_balance(cid, name)
        return _json(state.as_dict())

    async def reserve(self, request: Request) -> Response:
        body = await _parse(request, ReservationBody)
        if isinstance(body, Response):
            return body
        cid, name = request.path_params["id"], request.path_params["name"]
        given = request.headers.get("idempotency-key")
        # Without a key of the caller's, one of ours: if the reply is lost, the reservation
        # (made, or still on its way) is cancelled by it, so a 503 never leaves a hold behind.
        key = given or f"auto:{uuid.uuid4().hex}"
        try:
            await self.meter.sync(cid)
            rid, expires = await self.meter.run(
                self.meter.core.reserve(cid, name, body.amount, body.ttl_s, key)
            )
        except StorageUnavailable:
            if not given:
                self.recovery.cancel(cid, name, key)
            raise
        return _json({"id": rid, "expires_at": expires}, 201)

    async def close_reservation(self, request: Request) -> Response:
        rid, action = request.path_params["rid"], request.path_params["action"]
        key = request.headers.get("idempotency-key")
        if action == "commit":
            body = await _parse(request, AmountBody)
            if isinstance(body, Response):
                return body
            state = await self.meter.commit(rid, body.amount, key)
        else:
            state = await self.meter.release(rid, key)
        return _json(state.as_dict())

    async def ledger(self, request: Request) -> Response:
        cid = request.path_params["id"]
        limit = request.query_params.get("limit", "100")
        if not limit.isdigit() or not 0 < int(limit) <= 10_000:
            return _invalid([{"field": "limit", "message": "must be an integer from 1 to 10000"}])
        if await self.meter.run(directory.find_entitlement(self.meter.core, cid)) is None:
            raise NotFound(f"customer '{cid}' does not exist")
        return _json({"entries": await self.meter.ledger(cid, int(limit))})

    # -- events and health -------------------------------------------------------------------

    async def events(self, request: Request) -> Response:
        limit = request.query_params.get("limit", "100")
        if not limit.isdigit() or not 0 < int(limit) <= 10_000:
            return _invalid([{"field": "limit", "message": "must be an integer from 1 to 10000"}])
        rows = await self.meter.run(directory.events(self.meter.core, int(limit)))
        return _json({"events": rows})

    async def redeliver(self, request: Request) -> Response:
        event = await self.meter.run(
            directory.redeliver(self.meter.core, request.path_params["eid"])
        )
        return _json({"redelivered": event["id"]}, 202)

    async def healthz(self, request: Request) -> Response:
        from metergate.worker.loop import alive_workers

        workers: list[str] = []
        try:
            await self.meter.storage.run(Command(("PING",)))
            storage = "ok"
            now_ms = int(self.meter.core.clock() * 1000)
            workers = await alive_workers(self.meter.storage, self.meter.core.keys, now_ms)
        except StorageUnavailable:
            storage = "unreachable"
        status = 200 if storage == "ok" else 503
        body = {
            "status": "ok" if status == 200 else "degraded",
            "storage": storage,
            # a worker counts as alive when it finished a pass in the last 30 s
            "workers_alive": len(workers),
        }
        return _json(body, status)

    async def metrics(self, request: Request) -> Response:
        from metergate.worker.backlog import webhook_backlog

        backlog = await webhook_backlog(self.meter.storage, self.meter.core.keys)
        if backlog is not None:
            WEBHOOK_BACKLOG.set(backlog)
        return Response(generate_latest(REGISTRY), headers={"content-type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: Request) -> Response:
        return _json(OPENAPI)


ROUTES: list[tuple[str, str, str, bool, type[_Body] | None, str]] = [
    (
        "PUT",
        "/v1/customers/{id}",
        "put_customer",
        True,
        CustomerBody,
        "Create or replace a customer",
    ),
    (
        "GET",
        "/v1/customers/{id}",
        "get_customer",
        False,
        None,
        "A customer, its entitlement and balances",
    ),
    (
        "POST",
        "/v1/customers/{id}/api-keys",
        "issue_key",
        True,
        None,
        "Issue an API key (shown once)",
    ),
    (
        "DELETE",
        "/v1/customers/{id}/api-keys/{key_id}",
        "revoke_key",
        True,
        None,
        "Revoke an API key",
    ),
    (
        "PUT",
        "/v1/customers/{id}/entitlement",
        "put_entitlement",
        True,
        EntitlementBody,
        "Change plan, anchor or timezone",
    ),
    ("GET", "/v1/customers/{id}/usage", "get_usage", False, None, "Usage per metric"),
    (
        "POST",
        "/v1/customers/{id}/usage",
        "post_usage",
        True,
        UsageBody,
        "Record usage outside a request",
    ),
    (
        "POST",
        "/v1/customers/{id}/assets/{metric}/{action:suspend|resume}",
        "suspend_asset",
        True,
        None,
        "Suspend or resume an asset",
    ),
    ("GET", "/v1/customers/{id}/balances/{name}", "get_balance", False, None, "A balance"),
    (
        "POST",
        "/v1/customers/{id}/balances/{name}/{action:topup|withdraw}",
        "move_balance",
        True,
        PositiveAmountBody,
        "Top up or withdraw",
    ),
    (
        "POST",
        "/v1/customers/{id}/balances/{name}/{action:suspend|resume}",
        "flag_balance",
        True,
        None,
        "Suspend or resume a balance",
    ),
    (
        "POST",
        "/v1/customers/{id}/balances/{name}/reservations",
        "reserve",
        True,
        ReservationBody,
        "Hold an amount",
    ),
    (
        "POST",
        "/v1/reservations/{rid}/{action:commit}",
        "close_reservation",
        True,
        AmountBody,
        "Commit a reservation: charge the amount, release the rest",
    ),
    (
        "POST",
        "/v1/reservations/{rid}/{action:release}",
        "close_reservation",
        True,
        None,
        "Release a reservation",
    ),
    ("GET", "/v1/customers/{id}/ledger", "ledger", False, None, "Balance mutations, newest first"),
    ("GET", "/v1/events", "events", False, None, "The outbox"),
    ("POST", "/v1/events/{eid}/redeliver", "redeliver", True, None, "Deliver an event again"),
]


def _with_action(handler: Handler, action: str | None) -> Handler:
    if action is None:
        return handler

    async def endpoint(request: Request) -> Response:
        request.scope["path_params"]["action"] = action
        return await handler(request)

    return endpoint


def _by_method(handlers: dict[str, Handler]) -> Handler:
    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return endpoint


def _choices(path: str) -> list[tuple[str, str | None]]:
    """Expand `{action:a|b}` into one literal path per choice, with the choice."""
    import re

    match = re.search(r"\{(\w+):([^}]+)\}", path)
    if not match:
        return [(path, None)]
    return [
        (path[: match.start()] + choice + path[match.end() :], choice)
        for choice in match.group(2).split("|")
    ]


OPENAPI = build_document(ROUTES)


def admin_app(config: ConfigSource, *, meter: AsyncMeter | None = None) -> Starlette:
    """Return the admin API as an ASGI app (mount it anywhere, or let `metergate serve` run it)."""
    cfg = as_config(config)
    owned = meter is None
    api = AdminAPI(meter or AsyncMeter(cfg), cfg.admin.token)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if owned:
            api.meter.reopen()
        yield
        await api.recovery.close(5.0)
        if owned:  # a meter handed in belongs to the caller, who closes it
            await api.meter.aclose()

    # One Route per path, so a 405 lists every method of the path in `Allow`.
    by_path: dict[str, dict[str, Handler]] = {}
    for method, path, name, mutation, _model, _summary in ROUTES:
        for literal, action in _choices(path):
            handler = api.guard(_with_action(getattr(api, name), action), mutation=mutation)
            by_path.setdefault(literal, {})[method] = handler
    routes = [
        Route(literal, _by_method(handlers), methods=list(handlers))
        for literal, handlers in by_path.items()
    ]
    routes += [
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/metrics", api.guard(api.metrics), methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
    ]
    dashboard = Mount("/ui", app=dashboard_app(api))  # the operator dashboard (SPEC 4.1)
    app = Starlette(routes=[*routes, dashboard], lifespan=lifespan)
    app.state.api = api
    return app
