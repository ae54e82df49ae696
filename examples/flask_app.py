"""A Flask app metered by metergate's WSGI middleware, with the rules of examples/gateway.yaml.

Run (from the repository root, with metergate and flask installed):

    METERGATE_ADMIN_TOKEN=dev-token-0123456 python examples/flask_app.py

Then call it as the customer `acme` (plan `pro`, prepaid credits):

    curl -i localhost:8000/v1/models -H 'Authorization: Bearer acme-dev-key'
    curl -i localhost:8000/v1/chat/completions -H 'Authorization: Bearer acme-dev-key' \\
        -H 'Content-Type: application/json' -d '{"messages": [{"content": "hello there"}]}'

Each answer carries `Metergate-Level` and `Metergate-Balance`; the chat completion's tokens are
charged from its `X-Usage-Tokens` header once the response ends. Without a key: 401.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request

from metergate import WSGIMeteringMiddleware, load_config

CONFIG = load_config(Path(__file__).with_name("gateway.yaml"))

app = Flask(__name__)
app.wsgi_app = WSGIMeteringMiddleware(app.wsgi_app, CONFIG)  # type: ignore[method-assign]


def reply_to(messages: list[dict[str, Any]]) -> tuple[list[str], int]:
    """A stand-in for a model: echo the prompt's words; usage is prompt plus completion words."""
    prompt = " ".join(str(m.get("content", "")) for m in messages).split()
    completion = ["you", "said:", *prompt]
    return completion, len(prompt) + len(completion)


@app.post("/v1/chat/completions")
def chat_completions() -> Response:
    """Answer a chat completion; the tokens used go out in `X-Usage-Tokens`."""
    body = request.get_json(force=True, silent=True) or {}
    words, tokens = reply_to(body.get("messages", []))
    headers = {"X-Usage-Tokens": str(tokens)}
    if body.get("stream"):

        def events() -> Iterator[str]:
            for word in words:
                yield f"data: {word}\n\n"
            yield "data: [DONE]\n\n"

        return Response(events(), mimetype="text/event-stream", headers=headers)
    response = jsonify(content=" ".join(words), usage={"tokens": tokens})
    response.headers.update(headers)
    return response


@app.get("/v1/models")
def models() -> Response:
    """List the models (metered as one api call)."""
    return jsonify(data=[{"id": "echo-1"}])


@app.get("/healthz")
def healthz() -> Response:
    """Health check: `meter: []` in the config, so no key is needed."""
    return jsonify(status="ok")


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "8000")), threaded=True)
