"""The operator dashboard (SPEC 4.1): server-rendered pages under `/ui/` on the admin port.

No JavaScript and nothing fetched from elsewhere: the pages, one stylesheet and inline SVG
charts are all served from the package, so it works offline. The Content-Security-Policy
allows nothing else, so an operator's browser runs no script whatever a customer's name says.
"""

from __future__ import annotations

import urllib.parse
from datetime import UTC, datetime
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from metergate.core import directory
from metergate.core.errors import NotFound, StorageUnavailable
from metergate.ui.pages import customer_page, customers_page, events_page
from metergate.ui.session import LOGIN_COOKIE, SESSION_COOKIE, SESSION_TTL_S, Sessions

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from metergate.admin import AdminAPI

__all__ = ["dashboard_app"]

MAX_FORM_BYTES = 16_384
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
}


def _time(ms: Any) -> str:
    """Epoch milliseconds as a UTC time to the second."""
    try:
        return datetime.fromtimestamp(int(ms) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError):
        return ""


def _seconds(s: Any) -> str:
    """Epoch seconds as a UTC time to the minute."""
    return _time(int(s) * 1000)[:16] if isinstance(s, int) else ""


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("metergate.ui", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    env.filters["time"] = _time
    env.filters["seconds"] = _seconds
    env.filters["url"] = lambda s: urllib.parse.quote(str(s), safe="")
    env.filters["num"] = lambda n: f"{n:,}" if isinstance(n, int) else ("-" if n is None else n)
    return env


async def _form(request: Request) -> dict[str, str] | None:
    """Read an urlencoded form body (single values), or None when too large or malformed."""
    if request.headers.get("content-type", "").split(";")[0] != (
        "application/x-www-form-urlencoded"
    ):
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        pairs = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None
    return dict(pairs)


class Dashboard:
    """The dashboard's endpoints over the admin API's functions."""

    def __init__(self, api: AdminAPI) -> None:
        self.api = api
        self.sessions = Sessions(api.token)
        self.env = _environment()
        self.css = (files("metergate.ui") / "static" / "dashboard.css").read_bytes()

    # -- plumbing ----------------------------------------------------------------------------

    def _root(self, request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def _render(
        self, request: Request, template: str, code: int = 200, **context: Any
    ) -> HTMLResponse:
        root = self._root(request)
        html = self.env.get_template(template).render(root=root, **context)
        return HTMLResponse(html, code, headers=SECURITY_HEADERS)

    def _redirect(self, request: Request, to: str) -> Response:
        return RedirectResponse(self._root(request) + to, 303, headers=SECURITY_HEADERS)

    def _cookie(
        self, request: Request, response: Response, name: str, value: str, age: int
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=age,
            path=self._root(request) + "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def _refused(self, request: Request, message: str, status: int = 403) -> HTMLResponse:
        return self._render(request, "refused.html", status, message=message, signed_in=False)

    def _same_origin(self, request: Request) -> bool:
        """A browser's cross-site form post names another origin; refuse it before anything else.

        (Referrer-Policy same-origin keeps browsers sending our Origin: with no-referrer, Chrome
        sends `Origin: null` on form posts.)"""
        origin = request.headers.get("origin")
        if origin is None or origin == "null":
            return origin is None
        return urllib.parse.urlsplit(origin).netloc == request.headers.get("host", "")

    def page(
        self, handler: Callable[[Request, str], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a page: a session is required (else the sign-in page), errors become pages."""

        async def endpoint(request: Request) -> Response:
            sid = self.sessions.session_id(request.cookies.get(SESSION_COOKIE))
            if sid is None:
                return self._redirect(request, "/login")
            if request.method == "POST":
                form = await _form(request)
                if not self._same_origin(request) or form is None:
                    return self._refused(request, "This form was not sent from the dashboard.")
                if not self.sessions.csrf_ok(sid, form.get("csrf", "")):
                    return self._refused(request, "The form's CSRF token is missing or wrong.")
                request.state.form = form
            try:
                return await handler(request, sid)
            except NotFound as exc:
                return self._refused(request, str(exc).strip("'\""), 404)
            except StorageUnavailable:
                return self._refused(request, "Storage is unavailable.", 503)

        return endpoint

    # -- sign-in -----------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        nonce = self.sessions.login_nonce()
        response = self._render(
            request,
            "login.html",
            csrf=self.sessions.login_csrf(nonce),
            configured=bool(self.api.token),
            signed_in=False,
        )
        self._cookie(request, response, LOGIN_COOKIE, nonce, 3600)
        return response

    async def login(self, request: Request) -> Response:
        form = await _form(request)
        if not self._same_origin(request) or form is None:
            return self._refused(request, "This form was not sent from the dashboard.")
        if not self.sessions.login_csrf_ok(request.cookies.get(LOGIN_COOKIE), form.get("csrf", "")):
            return self._refused(request, "The form's CSRF token is missing or wrong.")
        if not self.sessions.token_matches(form.get("token", "")):
            nonce = self.sessions.login_nonce()
            refused = self._render(
                request,
                "login.html",
                401,
                csrf=self.sessions.login_csrf(nonce),
                configured=bool(self.api.token),
                error="That is not the admin token.",
                signed_in=False,
            )
            self._cookie(request, refused, LOGIN_COOKIE, nonce, 3600)
            return refused
        response = self._redirect(request, "/")
        self._cookie(request, response, SESSION_COOKIE, self.sessions.issue(), SESSION_TTL_S)
        response.delete_cookie(
            LOGIN_COOKIE, path=self._root(request) + "/", httponly=True, samesite="strict"
        )
        return response

    async def logout(self, request: Request, sid: str) -> Response:
        response = self._redirect(request, "/login")
        response.delete_cookie(
            SESSION_COOKIE, path=self._root(request) + "/", httponly=True, samesite="strict"
        )
        return response

    # -- pages -------------------------------------------------------------------------------

    async def customers(self, request: Request, sid: str) -> Response:
        data = await customers_page(self.api)
        return self._render(
            request, "customers.html", csrf=self.sessions.csrf(sid), signed_in=True, **data
        )

    async def customer(self, request: Request, sid: str) -> Response:
        raw = request.query_params.get("page", "1")
        page = int(raw) if raw.isdigit() and 0 < int(raw) <= 10_000 else 1
        await self.api.meter.sync(request.path_params["cid"])  # count what allowances gave
        data = await customer_page(self.api, request.path_params["cid"], page)
        return self._render(
            request, "customer.html", csrf=self.sessions.csrf(sid), signed_in=True, **data
        )

    async def events(self, request: Request, sid: str) -> Response:
        data = await events_page(self.api, request.query_params.get("status"))
        return self._render(
            request,
            "events.html",
            csrf=self.sessions.csrf(sid),
            signed_in=True,
            redelivered=request.query_params.get("redelivered"),
            **data,
        )

    async def redeliver(self, request: Request, sid: str) -> Response:
        event_id = request.state.form.get("event", "")
        event = await self.api.meter.run(directory.redeliver(self.api.meter.core, event_id))
        return self._redirect(
            request, "/events?redelivered=" + urllib.parse.quote(str(event["id"]), safe="")
        )

    async def stylesheet(self, request: Request) -> Response:
        return Response(
            self.css,
            media_type="text/css",
            headers={"cache-control": "max-age=3600", "x-content-type-options": "nosniff"},
        )


def dashboard_app(api: AdminAPI) -> Starlette:
    """Return the dashboard as an ASGI app over an AdminAPI (mounted at `/ui` by `admin_app`)."""
    ui = Dashboard(api)
    return Starlette(
        routes=[
            Route("/", ui.page(ui.customers), methods=["GET"]),
            Route("/login", ui.login_form, methods=["GET"]),
            Route("/login", ui.login, methods=["POST"]),
            Route("/logout", ui.page(ui.logout), methods=["POST"]),
            Route("/customers/{cid:path}", ui.page(ui.customer), methods=["GET"]),
            Route("/events", ui.page(ui.events), methods=["GET"]),
            Route("/events/redeliver", ui.page(ui.redeliver), methods=["POST"]),
            Route("/static/dashboard.css", ui.stylesheet, methods=["GET"]),
        ]
    )
