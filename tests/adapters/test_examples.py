"""The framework examples import, start and meter a request with examples/gateway.yaml."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from .harness import serve_asgi, serve_wsgi

REPO = Path(__file__).resolve().parents[2]
ACME = {"authorization": "Bearer acme-dev-key"}

# example -> (module, attribute, how it is served)
EXAMPLES = {
    "fastapi": ("examples.fastapi_app", "app", "asgi"),
    "flask": ("examples.flask_app", "app", "wsgi"),
    "django-wsgi": ("examples.django_project.wsgi", "application", "wsgi"),
    "django-asgi": ("examples.django_project.asgi", "application", "asgi-no-lifespan"),
}


@pytest.fixture(params=list(EXAMPLES))
def example(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Serve one example app on loopback, as its docstring's command would, and yield its URL."""
    monkeypatch.setenv("METERGATE_ADMIN_TOKEN", "dev-token-0123456")
    monkeypatch.syspath_prepend(str(REPO))
    module, attribute, how = EXAMPLES[request.param]
    app: Any = getattr(importlib.import_module(module), attribute)
    server: AbstractContextManager[str]
    if how == "wsgi":
        server = serve_wsgi(app)
    else:
        server = serve_asgi(app, lifespan="on" if how == "asgi" else "off")
    with server as url:
        yield url


def test_example_meters_a_request(example: str) -> None:
    """An example meters a keyed request, prices its tokens and refuses a request without a key."""
    with httpx.Client(base_url=example, timeout=10) as client:
        models = client.get("/v1/models", headers=ACME)
        assert models.status_code == 200 and models.json() == {"data": [{"id": "echo-1"}]}
        assert models.headers["metergate-level"] == "Normal"
        assert int(models.headers["metergate-balance"]) > 0
        chat = client.post(
            "/v1/chat/completions",
            headers=ACME,
            json={"messages": [{"role": "user", "content": "hello there"}]},
        )
        assert chat.status_code == 200 and chat.headers["x-usage-tokens"] == "6"
        assert "tokens" in chat.headers["ratelimit-policy"]
        assert client.get("/v1/models").status_code == 401
        assert client.get("/healthz").status_code == 200
