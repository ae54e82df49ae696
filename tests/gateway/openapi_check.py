"""Check admin API responses against the served OpenAPI document with openapi-core."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict


class OpenAPIRequest:
    """An httpx request as openapi-core reads one."""

    def __init__(self, request: httpx.Request) -> None:
        url = urlsplit(str(request.url))
        self.host_url = f"{url.scheme}://{url.netloc}"
        self.path = url.path
        self.method = request.method.lower()
        self.body: bytes | None = request.content or None
        self.content_type = request.headers.get("content-type", "")
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(parse_qs(url.query)),
            header=Headers(dict(request.headers)),
            cookie=ImmutableMultiDict(),
        )


class OpenAPIResponse:
    """An httpx response as openapi-core reads one."""

    def __init__(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        self.content_type = response.headers.get("content-type", "")
        self.headers = Headers(dict(response.headers))
        self.data: bytes | None = response.content


def response_checker(document: dict[str, Any]) -> Callable[[httpx.Response], None]:
    """Return an httpx response hook that validates each response against the document."""
    # openapi-core reads application/json only; RFC 9457's media type is JSON too
    config = Config(extra_media_type_deserializers={"application/problem+json": json.loads})
    api = OpenAPI.from_dict(document, config=config)

    def check(response: httpx.Response) -> None:
        response.read()
        api.validate_response(OpenAPIRequest(response.request), OpenAPIResponse(response))

    return check


def checked_client(base_url: str, token: str) -> httpx.Client:
    """An authorized client whose every response is validated against the served document."""
    document = httpx.get(f"{base_url}/openapi.json").json()
    return httpx.Client(
        base_url=base_url,
        headers={"Authorization": f"Bearer {token}"},
        event_hooks={"response": [response_checker(document)]},
    )
