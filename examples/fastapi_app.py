"""A FastAPI app metered by metergate's ASGI middleware, with the rules of examples/gateway.yaml.

Run (from the repository root, with metergate, fastapi and uvicorn installed):

    METERGATE_ADMIN_TOKEN=dev-token-0123456 uvicorn examples.fastapi_app:app

Then call it as the customer `acme` (plan `pro`, prepaid credits):

    curl -i localhost:8000/v1/models -H 'Authorization: Bearer acme-dev-key'
    curl -i localhost:8000/v1/chat/completions -H 'Authorization: Bearer acme-dev-key' \\
        -H 'Content-Type: application/json' -d '{"messages": [{"content": "hello there"}]}'
    curl -N localhost:8000/v1/chat/completions -H 'Authorization: Bearer acme-dev-key' \\
        -H 'Content-Type: application/json' -d '{"messages": [{"content": "hi"}], "stream": true}'

Each answer carries `Metergate-Level` and `Metergate-Balance`; the chat completion's tokens are
charged from its `X-Usage-Tokens` header once the response ends. Without a key: 401.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from metergate import MeteringMiddleware, load_config

CONFIG = load_config(Path(__file__).with_name("gateway.yaml"))

app = FastAPI(title="metergate example: FastAPI")
app.add_middleware(MeteringMiddleware, config=CONFIG)


def reply_to(messages: list[dict[str, Any]]) -> tuple[list[str], int]:
    """A stand-in for a model: echo the prompt's words; usage is prompt plus completion words."""
    prompt = " ".join(str(m.get("content", "")) for m in messages).split()
    completion = ["you", "said:", *prompt]
    return completion, len(prompt) + len(completion)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    """Answer a chat completion; the tokens used go out in `X-Usage-Tokens`."""
    body = await request.json()
    words, tokens = reply_to(body.get("messages", []))
    headers = {"X-Usage-Tokens": str(tokens)}
    if body.get("stream"):

        def events() -> Iterator[str]:
            for word in words:
                yield f"data: {word}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
    return JSONResponse({"content": " ".join(words), "usage": {"tokens": tokens}}, headers=headers)


@app.get("/v1/models")
async def models() -> dict[str, Any]:
    """List the models (metered as one api call)."""
    return {"data": [{"id": "echo-1"}]}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Health check: `meter: []` in the config, so no key is needed."""
    return {"status": "ok"}
